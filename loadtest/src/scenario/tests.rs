use super::*;

const FULL: &str = include_str!("../../scenarios/full.toml");
const EDGES: &str = include_str!("../../scenarios/edges.toml");
const DATAPLANE: &str = include_str!("../../scenarios/dataplane.toml");

#[test]
fn the_shipped_dataplane_scenario_reaches_a_workspace_attached_to_the_clients_edge() {
    let s = Scenario::parse(DATAPLANE).unwrap();
    assert!(!s.wan.enabled);
    // Agent 0 (the one every data-plane case reaches) is the first agent
    // of the first region with agents: it must be the client's region,
    // with an edge, so the path is one hop.
    let first = s.topology.regions.iter().find(|r| r.agents > 0).unwrap();
    assert_eq!(first.name, s.topology.client_region);
    assert_eq!(first.edges, 1);
    assert!(s.scenarios.small.is_some() && s.scenarios.bulk.is_some());
}

#[test]
fn the_shipped_edges_scenario_measures_the_edge_path_without_wan() {
    let s = Scenario::parse(EDGES).unwrap();
    assert!(!s.wan.enabled);
    assert_eq!(s.topology.regions.iter().filter(|r| r.edges > 0).count(), 2);
    assert!(s.scenarios.mesh.is_some() && s.scenarios.failover.is_some());
}

#[test]
fn the_shipped_full_scenario_parses_and_validates() {
    let s = Scenario::parse(FULL).unwrap();
    assert_eq!(s.topology.primary_region, "us-east");
    assert_eq!(s.topology.regions.len(), 3);
    assert!(s.scenarios.small.is_some() && s.scenarios.failover.is_some());
    assert_eq!(
        s.scenarios.small.as_ref().unwrap().protocols,
        [Protocol::Http1, Protocol::Http2]
    );
}

#[test]
fn the_full_scenario_includes_the_one_hop_data_plane_and_quick_shrinks_it_too() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let s = Scenario::load(&dir.join("full.toml")).unwrap();
    assert_eq!(s.parts.len(), 1);
    assert_eq!(s.parts[0], Scenario::parse(DATAPLANE).unwrap());
    let q = s.quick();
    assert_eq!(q.parts[0].scenarios.bulk.as_ref().unwrap().size_mib, 16);
}

#[test]
fn an_included_file_may_not_include_others_nor_reuse_a_name() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let body = |name: &str, include: &str| {
        DATAPLANE.replacen(
            "name = \"dataplane\"",
            &format!("name = \"{name}\"\ninclude = [{include}]"),
            1,
        )
    };
    write("leaf.toml", &body("leaf", ""));
    write("middle.toml", &body("middle", "\"leaf.toml\""));
    let top = write("top.toml", &body("top", "\"middle.toml\""));
    let err = format!("{:#}", Scenario::load(&top).unwrap_err());
    assert!(err.contains("may not include others"), "{err}");
    let same = write("same.toml", &body("leaf", "\"leaf.toml\""));
    let err = format!("{:#}", Scenario::load(&same).unwrap_err());
    assert!(err.contains("is taken"), "{err}");
    write(
        "bad-name.toml",
        &DATAPLANE.replacen("name = \"dataplane\"", "name = \"../x\"", 1),
    );
    let escape = write("escape.toml", &body("escape", "\"bad-name.toml\""));
    let err = format!("{:#}", Scenario::load(&escape).unwrap_err());
    assert!(err.contains("plain name"), "{err}");
    let ok = write("ok.toml", &body("ok", "\"leaf.toml\""));
    assert_eq!(Scenario::load(&ok).unwrap().parts[0].name, "leaf");
}

#[test]
fn rtt_is_symmetric_with_intra_region_and_fallback() {
    let s = Scenario::parse(FULL).unwrap();
    let ms = |a, b| s.wan.rtt(a, b).as_secs_f64() * 1000.0;
    assert_eq!(ms("us-east", "eu-west"), 80.0);
    assert_eq!(ms("eu-west", "us-east"), 80.0);
    assert_eq!(ms("ap-south", "eu-west"), 120.0);
    assert_eq!(ms("eu-west", "eu-west"), 2.0);
    let mut w = s.wan.clone();
    w.links.pop();
    // An unlisted pair takes the largest listed RTT, never zero.
    assert_eq!(w.rtt("us-east", "ap-south").as_secs_f64() * 1000.0, 120.0);
}

#[test]
fn unknown_fields_are_refused() {
    let text = FULL.replace("[scenarios.bulk]", "[scenarios.bulk]\nsize_gib = 1");
    let err = Scenario::parse(&text).unwrap_err().to_string();
    assert!(err.contains("size_gib"), "{err}");
}

#[test]
fn references_to_unknown_regions_are_refused() {
    let text = FULL.replace("client_region = \"eu-west\"", "client_region = \"mars\"");
    let err = Scenario::parse(&text).unwrap_err().to_string();
    assert!(err.contains("mars"), "{err}");
    let text = FULL.replace("[\"eu-west\", \"ap-south\"]", "[\"eu-west\", \"moon\"]");
    assert!(Scenario::parse(&text).is_err());
    let text = FULL.replace("name = \"ap-south\"", "name = \"Ap_South\"");
    assert!(Scenario::parse(&text).is_err());
}

#[test]
fn a_minimal_file_gets_defaults() {
    let s = Scenario::parse(
        r#"
name = "tiny"
[topology]
primary_region = "a"
client_region = "a"
regions = [{ name = "a", agents = 1 }]
[scenarios.small]
requests = 10
"#,
    )
    .unwrap();
    assert!(!s.wan.enabled);
    assert!(s.baselines.direct && s.baselines.nginx);
    let small = s.scenarios.small.unwrap();
    assert_eq!(small.concurrency, [1, 64]);
    assert_eq!(small.body_bytes, 1024);
    assert!(s.scenarios.bulk.is_none());
}

#[test]
fn quick_shrinks_every_scenario_but_keeps_them_all() {
    let full = Scenario::parse(FULL).unwrap();
    let q = full.clone().quick();
    assert!(q.validate().is_ok());
    assert_eq!(q.scenarios.bulk.as_ref().unwrap().size_mib, 16);
    assert!(q.scenarios.websockets.as_ref().unwrap().connections <= 100);
    assert!(q.scenarios.agents.as_ref().unwrap().count <= 32);
    assert!(q.scenarios.slow_reader.as_ref().unwrap().duration_s <= 3.0);
    assert!(q.topology.regions.iter().all(|r| r.agents <= 1));
    // Every scenario of the full file is still there.
    let on = |s: &Scenarios| {
        [
            s.small.is_some(),
            s.bulk.is_some(),
            s.websockets.is_some(),
            s.agents.is_some(),
            s.regions.is_some(),
            s.fairness.is_some(),
            s.slow_reader.is_some(),
            s.failover.is_some(),
        ]
    };
    assert_eq!(on(&q.scenarios), on(&full.scenarios));
}
