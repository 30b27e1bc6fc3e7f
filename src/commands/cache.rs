//! `newt cache ls | show | gc | pin | unpin | verify`, `newt inspect`, `newt query`.

use std::path::Path;

use newt_cache::{Cache, Manifest};

use super::{open_cache, session, shown};
use crate::cli::{CacheCommand, Cli};

/// `newt cache ...`
pub fn cache(cli: &Cli, cmd: &CacheCommand) -> anyhow::Result<i32> {
    let cache = open_cache(cli)?;
    match cmd {
        CacheCommand::Ls => {
            let mut ms = cache.manifests()?;
            ms.sort_by_key(|m| std::cmp::Reverse(m.created_unix));
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&ms)?);
                return Ok(0);
            }
            println!("{:<14} {:<16} {:<14} {:>10} {:>8}", "output", "stage", "kind", "size", "took");
            for m in ms {
                let size: u64 = m.files.iter().map(|f| f.size).sum();
                println!(
                    "{:<14} {:<16} {:<14} {:>10} {:>7.1}s",
                    m.output.short(),
                    m.stage_id,
                    m.kind,
                    human(size),
                    m.elapsed_ms as f64 / 1000.0
                );
            }
            println!("cache: {}", cache.root().display());
        }
        CacheCommand::Show { digest } => {
            let m = find(&cache, digest)?;
            show(cli, &cache, &m)?;
        }
        CacheCommand::Gc { dry_run } => {
            let r = cache.gc(*dry_run)?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                let verb = if *dry_run { "would remove" } else { "removed" };
                for p in &r.removed {
                    println!("{verb} {}", p.display());
                }
                println!("{verb} {} entries, {}", r.removed.len(), human(r.bytes_freed));
            }
        }
        CacheCommand::Pin { digest, name } => {
            let m = find(&cache, digest)?;
            cache.pin(&m.output, name)?;
            println!("pinned {} as {name}", m.output.short());
        }
        CacheCommand::Unpin { name } => {
            if !cache.unpin(name)? {
                let pins: Vec<String> = cache.pins()?.into_iter().map(|p| p.name).collect();
                let known =
                    if pins.is_empty() { "there are none".to_string() } else { format!("pins: {}", pins.join(", ")) };
                anyhow::bail!(
                    "no pin named `{name}` in cache {} ({known}; see `newt cache ls`)",
                    cache.root().display()
                );
            }
            println!("unpinned {name}");
        }
        CacheCommand::Verify { repair } => return verify(cli, &cache, *repair),
    }
    Ok(0)
}

/// `newt cache verify [--repair]`: reads every object of the store and compares it with its
/// digest. Exit code 1 when something is damaged and `--repair` was not given; with it, the
/// damaged results are removed (their stages run again next time) and the exit code is 0.
pub fn verify(cli: &Cli, cache: &Cache, repair: bool) -> anyhow::Result<i32> {
    let r = cache.verify(repair)?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        for object in &r.damaged_objects {
            println!("damaged object {}", object.path.display());
            for damage in &object.damage {
                println!("  {damage}");
            }
        }
        for m in &r.broken_manifests {
            println!("broken manifest {}: {}", m.path.display(), m.problem);
        }
        for p in &r.removed {
            println!("removed {}", p.display());
        }
        println!(
            "checked {} objects ({} files, {}): {} damaged, {} broken manifests",
            r.objects_checked,
            r.files_checked,
            human(r.bytes_checked),
            r.damaged_objects.len(),
            r.broken_manifests.len()
        );
        if !r.is_clean() && !repair {
            eprintln!("hint: `newt cache verify --repair` removes them; the next run makes those results again");
        }
    }
    Ok(if r.is_clean() || repair { 0 } else { crate::exit::FAILURE })
}

fn human(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 { format!("{b} B") } else { format!("{v:.1} {}", U[i]) }
}

/// The manifest of a digest or key prefix.
fn find(cache: &Cache, prefix: &str) -> anyhow::Result<Manifest> {
    let ms = cache.manifests()?;
    let hits: Vec<&Manifest> = ms
        .iter()
        .filter(|m| m.output.to_string().starts_with(prefix) || m.key.to_string().starts_with(prefix))
        .collect();
    match hits.as_slice() {
        [] => anyhow::bail!("no cached result matches `{prefix}` (see `newt cache ls`)"),
        [m] => Ok((*m).clone()),
        many => {
            let first = many[0].output;
            if many.iter().all(|m| m.output == first) {
                return Ok(many[0].clone());
            }
            anyhow::bail!("`{prefix}` matches {} results; give more digits", many.len())
        }
    }
}

/// The artifact `target` names. With a pipeline, only that pipeline's results count: the
/// stage's result for the pipeline as it is now, else the one its last run produced (said on
/// stderr), else an error saying the stage has not run. Without one, the newest result of any
/// pipeline's stage with this id (said on stderr), or a digest prefix.
fn resolve(cli: &Cli, cache: &Cache, target: &str, pipeline: Option<&Path>) -> anyhow::Result<Manifest> {
    if let Some(path) = pipeline {
        let s = session(cli, path)?;
        let p = newt_stages::topology::compile(&s.loaded.config)?;
        if p.node(target).is_none() {
            let ids: Vec<&str> = p.nodes().map(|n| n.id.as_str()).collect();
            anyhow::bail!("{} has no stage `{target}`; its stages are {}", shown(path), ids.join(", "));
        }
        let registry = newt_stages::registry();
        let plan = newt_graph::why::plan(&p, &registry, &s.cache, &s.loaded.base_dir, &s.pipeline_id)?;
        if let Some(e) = plan.iter().find(|e| e.id == target && e.hit)
            && let Some(key) = e.key
            && let Some(m) = s.cache.lookup(&key)?.manifest
        {
            return Ok(m);
        }
        if let Some(run) = s.cache.last_run(&s.pipeline_id)?
            && let Some(st) = run.stages.get(target)
            && let Some(m) = s.cache.lookup(&st.key)?.manifest
        {
            eprintln!("note: `{target}` of {} changed since its last run; showing that run's result", shown(path));
            return Ok(m);
        }
        anyhow::bail!(
            "`{target}` of {} has not run yet (or its result was collected): run `newt run {}` first",
            shown(path),
            shown(path)
        );
    }
    let mut ms: Vec<Manifest> = cache.manifests()?.into_iter().filter(|m| m.stage_id == target).collect();
    ms.sort_by_key(|m| std::cmp::Reverse(m.created_unix));
    match ms.into_iter().next() {
        Some(m) => {
            eprintln!(
                "note: the newest cached `{target}` of any pipeline ({}); pass -p PIPELINE.yml for a given pipeline's",
                m.output.short()
            );
            Ok(m)
        }
        None => find(cache, target),
    }
}

fn show(cli: &Cli, cache: &Cache, m: &Manifest) -> anyhow::Result<()> {
    if cli.json {
        println!("{}", serde_json::to_string_pretty(m)?);
        return Ok(());
    }
    println!("stage    {} ({})", m.stage_id, m.kind);
    println!("key      {}", m.key);
    println!("output   {}", m.output);
    println!("path     {}", cache.object_path(&m.output).display());
    println!("took     {:.2}s", m.elapsed_ms as f64 / 1000.0);
    if !m.summary.is_null() {
        println!("summary  {}", serde_json::to_string_pretty(&m.summary)?.replace('\n', "\n         "));
    }
    println!("files");
    for f in &m.files {
        println!("  {:>10}  {}", human(f.size), f.path);
    }
    Ok(())
}

/// `newt inspect`: manifest, files and the typed view of the artifact's kind.
pub fn inspect(cli: &Cli, target: &str, pipeline: Option<&Path>, n: usize) -> anyhow::Result<i32> {
    let cache = match pipeline {
        Some(p) => (*session(cli, p)?.cache).clone(),
        None => open_cache(cli)?,
    };
    let m = resolve(cli, &cache, target, pipeline)?;
    show(cli, &cache, &m)?;
    if !cli.json {
        let color = console::colors_enabled();
        if let Some(view) = newt_stages::views::inspect(&m.kind, &cache.object_path(&m.output), n, color)? {
            println!();
            println!("{view}");
        }
    }
    Ok(0)
}

/// `newt query`: SQL over the Parquet files of an artifact.
pub fn query(cli: &Cli, target: &str, sql: &str, pipeline: Option<&Path>) -> anyhow::Result<i32> {
    let cache = match pipeline {
        Some(p) => (*session(cli, p)?.cache).clone(),
        None => open_cache(cli)?,
    };
    let m = resolve(cli, &cache, target, pipeline)?;
    let dir = cache.object_path(&m.output);
    let tables: Vec<(String, std::path::PathBuf)> = m
        .files
        .iter()
        .filter(|f| f.path.ends_with(".parquet"))
        .map(|f| {
            let stem = Path::new(&f.path)
                .file_stem()
                .map(|s| s.to_string_lossy().replace(['-', '.'], "_"))
                .unwrap_or_default();
            (stem, dir.join(&f.path))
        })
        .collect();
    if tables.is_empty() {
        anyhow::bail!("{} ({}) has no Parquet files to query", shown(&dir), m.stage_id);
    }
    print!("{}", newt_data::query(&tables, sql)?);
    Ok(0)
}
