//! `devmesh edges ...` (owners) and `devmesh regions`.

use devmesh_shared::api::{
    CreateEdgeRequest, CreateEdgeResponse, Edge, EdgesResponse, RegionsResponse, UpdateEdgeRequest,
};

use super::Global;
use crate::output::{Format, json, table};

#[derive(Debug, Clone, clap::Subcommand)]
pub(crate) enum EdgesCommand {
    /// Create a region's edge; its token is shown once.
    Create {
        /// Region name, e.g. eu-west.
        name: String,
        /// Name shown to users.
        #[arg(long)]
        display_name: Option<String>,
        #[command(flatten)]
        addresses: AddressArgs,
    },
    /// List edges and their health.
    List,
    /// Rename an edge or change its names and addresses (an empty value
    /// clears one).
    Update {
        /// Edge name or id.
        edge: String,
        /// New region name.
        #[arg(long)]
        name: Option<String>,
        /// New display name.
        #[arg(long)]
        display_name: Option<String>,
        #[command(flatten)]
        addresses: AddressArgs,
    },
    /// Issue a new token; the old one stops working.
    RegenerateToken {
        /// Edge name or id.
        edge: String,
    },
    /// Delete an edge.
    Delete {
        /// Edge name or id.
        edge: String,
    },
}

/// The domains and addresses an edge's replicas must register with.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct AddressArgs {
    /// The region's base URL, e.g. https://eu.example.com (required before
    /// the edge can register).
    #[arg(long)]
    access_url: Option<String>,
    /// The region's app wildcard, e.g. '*.eu.apps.example.com'.
    #[arg(long)]
    wildcard_hostname: Option<String>,
    /// A global app wildcard the edge also serves, e.g. '*.apps.example.com'.
    #[arg(long)]
    global_wildcard_hostname: Option<String>,
    /// A host (name or IP) the edge's relays may advertise; repeat for
    /// several. Default: the access URL's host.
    #[arg(long = "relay-host")]
    relay_hosts: Option<Vec<String>>,
}

fn print_token(g: &Global, base: &str, resp: &CreateEdgeResponse) -> anyhow::Result<()> {
    if g.output == Format::Json {
        return json(resp);
    }
    eprintln!(
        "Edge {} ({}) token, shown only this once:",
        resp.edge.name, resp.edge.id
    );
    println!("{}", resp.edge_token);
    eprintln!(
        "\nStart it with:\n  devmesh edge --primary-url {base} --edge-token '<token above>' --access-url {}",
        resp.edge
            .access_url
            .as_deref()
            .unwrap_or("<the access URL set with `devmesh edges update --access-url`>")
    );
    Ok(())
}

pub(crate) async fn run(g: &Global, cmd: EdgesCommand) -> anyhow::Result<()> {
    let client = g.client()?;
    match cmd {
        EdgesCommand::Create {
            name,
            display_name,
            addresses: a,
        } => {
            let req = CreateEdgeRequest {
                name,
                display_name,
                access_url: a.access_url,
                wildcard_hostname: a.wildcard_hostname,
                global_wildcard_hostname: a.global_wildcard_hostname,
                relay_hosts: a.relay_hosts.unwrap_or_default(),
            };
            let resp: CreateEdgeResponse = client.post("/edges", &req).await?;
            print_token(g, client.base(), &resp)?;
        }
        EdgesCommand::List => {
            let resp: EdgesResponse = client.get("/edges").await?;
            if g.output == Format::Json {
                return json(&resp.edges);
            }
            table(
                &["NAME", "DISPLAY NAME", "STATUS", "ACCESS URL", "ID"],
                resp.edges
                    .iter()
                    .map(|e| {
                        vec![
                            e.name.clone(),
                            e.display_name.clone(),
                            e.status.to_string(),
                            e.access_url.clone().unwrap_or_default(),
                            e.id.to_string(),
                        ]
                    })
                    .collect(),
            );
        }
        EdgesCommand::Update {
            edge,
            name,
            display_name,
            addresses: a,
        } => {
            let req = UpdateEdgeRequest {
                name,
                display_name,
                access_url: a.access_url,
                wildcard_hostname: a.wildcard_hostname,
                global_wildcard_hostname: a.global_wildcard_hostname,
                relay_hosts: a.relay_hosts,
            };
            let e: Edge = client.patch(&format!("/edges/{edge}"), &req).await?;
            println!("Updated edge {} ({}).", e.name, e.display_name);
        }
        EdgesCommand::RegenerateToken { edge } => {
            let resp: CreateEdgeResponse = client
                .post(&format!("/edges/{edge}/token"), &serde_json::json!({}))
                .await?;
            print_token(g, client.base(), &resp)?;
        }
        EdgesCommand::Delete { edge } => {
            client.delete(&format!("/edges/{edge}")).await?;
            println!("Deleted edge {edge}.");
        }
    }
    Ok(())
}

pub(crate) async fn regions(g: &Global) -> anyhow::Result<()> {
    let client = g.client()?;
    let resp: RegionsResponse = client.get("/regions").await?;
    if g.output == Format::Json {
        return json(&resp.regions);
    }
    table(
        &["NAME", "DISPLAY NAME", "STATUS", "ACCESS URL", "WILDCARD"],
        resp.regions
            .iter()
            .map(|r| {
                vec![
                    r.name.clone(),
                    r.display_name.clone(),
                    r.status.to_string(),
                    r.access_url.clone().unwrap_or_default(),
                    r.wildcard_hostname.clone().unwrap_or_default(),
                ]
            })
            .collect(),
    );
    Ok(())
}
