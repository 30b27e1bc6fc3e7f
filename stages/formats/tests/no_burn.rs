//! The file formats build without Burn: nothing in newt-formats' dependency closure (as Cargo.lock
//! records it) is Burn or CubeCL, so a tool that only reads, converts or merges model files does
//! not compile a tensor framework.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Cargo.lock's packages: name → names of its dependencies (a name with a version keeps the name).
fn lock_graph(lock: &str) -> BTreeMap<String, Vec<String>> {
    let mut graph = BTreeMap::new();
    for block in lock.split("[[package]]").skip(1) {
        let name = block
            .lines()
            .find_map(|l| l.strip_prefix("name = "))
            .map(|n| n.trim_matches('"').to_string())
            .expect("a package name");
        let mut deps = Vec::new();
        if let Some(at) = block.find("dependencies = [") {
            let list = &block[at + "dependencies = [".len()..];
            let list = &list[..list.find(']').expect("the list's end")];
            for item in list.split(',') {
                let item = item.trim().trim_matches('"');
                if let Some(dep) = item.split_whitespace().next() {
                    deps.push(dep.to_string());
                }
            }
        }
        graph.entry(name).or_insert_with(Vec::new).extend(deps);
    }
    graph
}

fn closure(graph: &BTreeMap<String, Vec<String>>, root: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![root.to_string()];
    while let Some(name) = todo.pop() {
        if seen.insert(name.clone()) {
            todo.extend(graph.get(&name).into_iter().flatten().cloned());
        }
    }
    seen
}

#[test]
fn the_formats_crate_depends_on_neither_burn_nor_cubecl() {
    let lock = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.lock")).unwrap();
    let graph = lock_graph(&lock);
    let formats = closure(&graph, "newt-formats");
    // The walk is real: it reaches what the crate uses, and the model crate's closure has Burn.
    for used in ["serde_json", "memmap2", "tokenizers", "newt-cache", "newt-hub"] {
        assert!(formats.contains(used), "newt-formats should reach {used}: {formats:?}");
    }
    assert!(closure(&graph, "newt-model").iter().any(|n| n.starts_with("burn")));
    let heavy: Vec<_> = formats.iter().filter(|n| n.starts_with("burn") || n.starts_with("cubecl")).collect();
    assert!(heavy.is_empty(), "newt-formats pulls in {heavy:?}");
}
