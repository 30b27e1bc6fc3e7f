//! The quickstart pipeline and its data copied into a temp dir with its own cache, and the
//! `newt` binary run there (shared by the binary tests).

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    /// The quickstart with `num_epochs` instead of its 8 (the tests are about the graph or the
    /// server, not the model).
    pub fn with_epochs(num_epochs: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        std::fs::copy(root.join("pipelines/data/quickstart.jsonl"), dir.path().join("data/quickstart.jsonl")).unwrap();
        let yaml = std::fs::read_to_string(root.join("pipelines/quickstart.yml")).unwrap();
        let yaml = yaml.replace("num_epochs: 8", &format!("num_epochs: {num_epochs}"));
        std::fs::write(dir.path().join("p.yml"), yaml).unwrap();
        Project { dir }
    }
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    /// `newt ARGS` in the project's folder, with its cache.
    pub fn newt(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_newt"));
        c.args(args).current_dir(self.dir.path()).env("NEWT_CACHE_DIR", self.path("cache")).env("NO_COLOR", "1");
        c
    }
}
