//! The `newt` binary: parse arguments, call the libraries, render results and errors, choose
//! the exit code. Results go to stdout, progress and warnings to stderr.

mod cli;
mod commands;
mod reporter;

use clap::Parser;

/// mimalloc instead of glibc's malloc: tokenizing allocates many small strings and vectors on
/// every thread (bench/results/data_tokenize_pack.md measured the difference).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit codes.
pub mod exit {
    /// A stage failed or a command could not do its work.
    pub const FAILURE: i32 = 1;
    /// The pipeline file or the command line is wrong.
    pub const USAGE: i32 = 2;
    /// Interrupted (Ctrl-C, SIGINT).
    pub const INTERRUPTED: i32 = 130;
    /// Stopped by SIGTERM (a scheduler's preemption or `kill`).
    pub const TERMINATED: i32 = 143;
}

fn main() {
    if std::env::var_os("NO_COLOR").is_some() {
        console::set_colors_enabled(false);
        console::set_colors_enabled_stderr(false);
    }
    let cli = cli::Cli::parse();
    let code = match commands::dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            let usage = e.downcast_ref::<newt_config::ConfigError>().is_some()
                || e.downcast_ref::<newt_graph::compile::CompileError>().is_some();
            eprintln!("{} {}", console::style("error:").red().bold(), newt_graph::error_chain(&e));
            if usage { exit::USAGE } else { exit::FAILURE }
        }
    };
    std::process::exit(code);
}
