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
    },
    /// List edges and their health.
    List,
    /// Rename an edge or change its display name.
    Update {
        /// Edge name or id.
        edge: String,
        /// New region name.
        #[arg(long)]
        name: Option<String>,
        /// New display name.
        #[arg(long)]
        display_name: Option<String>,
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
        "\nStart it with:\n  devmesh edge --primary-url {base} --edge-token '<token above>' --access-url https://<region host>"
    );
    Ok(())
}

pub(crate) async fn run(g: &Global, cmd: EdgesCommand) -> anyhow::Result<()> {
    let client = g.client()?;
    match cmd {
        EdgesCommand::Create { name, display_name } => {
            let resp: CreateEdgeResponse = client
                .post("/edges", &CreateEdgeRequest { name, display_name })
                .await?;
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
                            e.status.clone(),
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
        } => {
            let e: Edge = client
                .patch(
                    &format!("/edges/{edge}"),
                    &UpdateEdgeRequest { name, display_name },
                )
                .await?;
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
                    r.status.clone(),
                    r.access_url.clone().unwrap_or_default(),
                    r.wildcard_hostname.clone().unwrap_or_default(),
                ]
            })
            .collect(),
    );
    Ok(())
}
