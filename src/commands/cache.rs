//! `newt cache ls | show | gc | pin | unpin | push | pull | verify`, `newt inspect`, `newt query`.

use std::path::Path;
use std::sync::Arc;

use newt_cache::{Cache, Digest, Manifest, Pulled, Pushed, Remote};

use super::{open_cache, remote, session, shown};
use crate::cli::{CacheCommand, Cli};

/// `newt cache ...`
pub fn cache(cli: &Cli, cmd: &CacheCommand) -> anyhow::Result<i32> {
    match cmd {
        CacheCommand::Push { digests, pipeline, all } => return push(cli, digests, pipeline.as_deref(), *all),
        CacheCommand::Pull { digests, pipeline, all } => return pull(cli, digests, pipeline.as_deref(), *all),
        _ => {}
    }
    let cache = open_cache(cli)?;
    match cmd {
        CacheCommand::Ls { from_remote: true, pipeline } => return ls_remote(cli, pipeline.as_deref()),
        CacheCommand::Ls { .. } => {
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
        CacheCommand::Push { .. } | CacheCommand::Pull { .. } => unreachable!("handled above"),
    }
    Ok(0)
}

/// The local cache and the remote of a command: the pipeline's when one is given, else
/// `--cache-dir` / `--remote`. An error when no remote is configured.
fn with_remote(cli: &Cli, pipeline: Option<&Path>) -> anyhow::Result<(Cache, Arc<Remote>, Option<super::Session>)> {
    let (cache, remote, s) = match pipeline {
        Some(p) => {
            let s = session(cli, p)?;
            ((*s.cache).clone(), s.remote.clone(), Some(s))
        }
        None => (open_cache(cli)?, remote(cli, None)?, None),
    };
    let remote = remote.ok_or_else(|| {
        anyhow::anyhow!("no remote cache is configured: pass --remote s3://bucket/prefix (or NEWT_CACHE_REMOTE), or -p a pipeline with `cache: {{remote: ...}}`")
    })?;
    Ok((cache, remote, s))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// `newt cache ls --from-remote`: each result in the remote, whether this machine has it,
/// and why it would not use one (the trust checks of a pull, without downloading).
fn ls_remote(cli: &Cli, pipeline: Option<&Path>) -> anyhow::Result<i32> {
    let (cache, remote, _) = with_remote(cli, pipeline)?;
    let entries = runtime()?.block_on(remote.entries())?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(0);
    }
    // Which keys this machine has: the listing's shallow check (files and sizes), not a
    // per-key lookup that may hash whole objects.
    let local: std::collections::BTreeSet<Digest> = cache.manifests()?.into_iter().map(|m| m.key).collect();
    println!("{:<14} {:<14} {:<16} {:<14} {:>10}  {:<10} writer", "key", "output", "stage", "kind", "size", "here");
    for e in &entries {
        let here = if local.contains(&e.key) { "local" } else { "remote" };
        let writer = e.writer.as_deref().unwrap_or("?");
        match &e.manifest {
            Some(m) => println!(
                "{:<14} {:<14} {:<16} {:<14} {:>10}  {here:<10} {writer}",
                e.key.short(),
                m.output.short(),
                m.stage_id,
                m.kind,
                human(m.files.iter().map(|f| f.size).sum())
            ),
            None => println!(
                "{:<14} {:<14} {:<16} {:<14} {:>10}  {:<10} {writer}: not used: {}",
                e.key.short(),
                "-",
                "-",
                "-",
                "-",
                "refused",
                e.problem.as_deref().unwrap_or("")
            ),
        }
    }
    println!("remote: {} ({} results)", remote.url(), entries.len());
    Ok(0)
}

/// `newt cache push`.
fn push(cli: &Cli, digests: &[String], pipeline: Option<&Path>, all: bool) -> anyhow::Result<i32> {
    let (cache, remote, s) = with_remote(cli, pipeline)?;
    let manifests: Vec<Manifest> = if all {
        cache.manifests()?
    } else if !digests.is_empty() {
        digests.iter().map(|d| find(&cache, d)).collect::<anyhow::Result<_>>()?
    } else if let Some(s) = &s {
        let run = cache.last_run(&s.pipeline_id)?.ok_or_else(|| {
            anyhow::anyhow!("{} has not run with this cache yet: `newt run` it first", shown(&s.loaded.path))
        })?;
        run.stages.values().filter_map(|st| cache.lookup(&st.key).ok().and_then(|l| l.manifest)).collect()
    } else {
        anyhow::bail!("say what to push: digests, -p PIPELINE (its latest run) or --all");
    };
    let rt = runtime()?;
    let mut failed = 0;
    let mut events = Vec::new();
    for m in &manifests {
        let result = rt.block_on(remote.push(&cache, &m.key, false));
        let what = match &result {
            Ok(Pushed::Uploaded { files, bytes }) => {
                format!("uploaded {files} file{} ({})", if *files == 1 { "" } else { "s" }, human(*bytes))
            }
            Ok(Pushed::AlreadyThere) => "already there".to_string(),
            Ok(Pushed::LocalOnly) => {
                "not uploaded: it names files of this machine (a model's weights kept in place)".to_string()
            }
            Ok(Pushed::KeptOther { output }) => format!("the remote keeps another writer's result {}", output.short()),
            Err(e) => {
                failed += 1;
                format!("FAILED: {e}")
            }
        };
        if cli.json {
            events.push(serde_json::json!({"stage": m.stage_id, "key": m.key, "output": m.output, "result": what}));
        } else {
            println!("{:<16} {}  {what}", m.stage_id, m.output.short());
        }
    }
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&events)?);
    } else {
        println!("{} results, {} failed; remote {}", manifests.len(), failed, remote.url());
    }
    Ok(if failed == 0 { 0 } else { crate::exit::FAILURE })
}

/// `newt cache pull`.
fn pull(cli: &Cli, digests: &[String], pipeline: Option<&Path>, all: bool) -> anyhow::Result<i32> {
    let (cache, remote, _) = with_remote(cli, pipeline)?;
    let rt = runtime()?;
    let keys: Vec<Digest> = if all {
        rt.block_on(remote.keys())?
    } else if digests.is_empty() {
        anyhow::bail!("say what to pull: digest or key prefixes, or --all");
    } else {
        let mut keys = Vec::new();
        for d in digests {
            match rt.block_on(remote.find(d))? {
                Some(k) => keys.push(k),
                None => anyhow::bail!("{} has no result matching `{d}`", remote.url()),
            }
        }
        keys
    };
    let mut failed = 0;
    for key in keys {
        let result = pull_one(&rt, &cache, &remote, &key);
        let what = match &result {
            Ok(Some(m)) => {
                format!("{:<16} {}  in {}", m.stage_id, m.output.short(), shown(&cache.object_path(&m.output)))
            }
            Ok(None) => format!("{}  no result", key.short()),
            Err(e) => {
                failed += 1;
                format!("{}  FAILED: {e}", key.short())
            }
        };
        println!("{what}");
    }
    Ok(if failed == 0 { 0 } else { crate::exit::FAILURE })
}

/// Pulls one key under its lock (a local result is kept as it is).
fn pull_one(
    rt: &tokio::runtime::Runtime,
    cache: &Cache,
    remote: &Remote,
    key: &Digest,
) -> anyhow::Result<Option<Manifest>> {
    if let Some(m) = cache.lookup(key)?.manifest {
        return Ok(Some(m));
    }
    let _lock = cache.lock_key(key)?;
    if let Some(m) = cache.lookup(key)?.manifest {
        return Ok(Some(m));
    }
    match rt.block_on(remote.pull(cache, key))? {
        Pulled::Hit(m) => Ok(Some(m)),
        Pulled::Miss => Ok(None),
        Pulled::Rejected(why) => anyhow::bail!("not using the result in {}: {why}", remote.url()),
    }
}

/// [`find`], else the remote's result for the prefix, pulled into the local cache.
fn find_or_pull(cli: &Cli, cache: &Cache, prefix: &str, remote: Option<&Arc<Remote>>) -> anyhow::Result<Manifest> {
    let local = find(cache, prefix);
    let (Err(_), Some(remote)) = (&local, remote) else { return local };
    let rt = runtime()?;
    let Some(key) = rt.block_on(remote.find(prefix))? else { return local };
    match pull_one(&rt, cache, remote, &key)? {
        Some(m) => {
            if !cli.json {
                eprintln!("note: pulled {} ({}) from {}", m.output.short(), m.stage_id, remote.url());
            }
            Ok(m)
        }
        None => local,
    }
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
        // With a remote cache, stages after a remote result are keyed too (and pulled below).
        let rt = runtime()?;
        let ask = |key: &Digest| s.remote.as_ref().and_then(|r| rt.block_on(r.output_of(key)).ok().flatten());
        let plan =
            newt_graph::why::plan_with_remote(&p, &registry, &s.cache, &s.loaded.base_dir, &s.pipeline_id, &ask)?;
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
        // The result the pipeline's current key names, from the remote cache.
        if let Some(remote) = &s.remote
            && let Some(key) = plan.iter().find(|e| e.id == target).and_then(|e| e.key)
            && let Some(m) = pull_one(&rt, &s.cache, remote, &key)?
        {
            eprintln!("note: pulled `{target}` ({}) from {}", m.output.short(), remote.url());
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
        None => find_or_pull(cli, cache, target, remote(cli, None)?.as_ref()),
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
