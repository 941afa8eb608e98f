//! Command-line start-up shared by both binaries: `--config PATH`,
//! `--check-config`, and exit code 2 with one line naming the bad key.

use std::path::PathBuf;

use crate::config::{Config, Role, Source};

/// Exit code for a configuration or usage error.
pub const EXIT_CONFIG: i32 = 2;

/// What `main` should do after parsing arguments and loading config.
pub struct Startup {
    pub config: Config,
    pub source: Source,
}

/// Parses `args` (without the program name), loads and validates the
/// configuration. Exits the process with code 2 on a bad argument or config,
/// and with 0 after `--check-config` (which prints the masked config).
pub fn startup(binary: &str, role: Role, args: impl Iterator<Item = String>) -> Startup {
    let mut path: Option<PathBuf> = None;
    let mut check = false;
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => match args.next() {
                Some(p) => path = Some(PathBuf::from(p)),
                None => fail(binary, "--config needs a path"),
            },
            s if s.starts_with("--config=") => path = Some(PathBuf::from(&s["--config=".len()..])),
            "--check-config" => check = true,
            "--help" | "-h" => {
                println!(
                    "usage: {binary} [--config PATH] [--check-config]\n\nPATH defaults to $DAISI_WS_CONFIG, then config/config.yaml.\nEvery key can be overridden by DAISI_WS_<SECTION>_<KEY>."
                );
                std::process::exit(0);
            }
            "--version" | "-V" => {
                println!("{binary} {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            other => fail(binary, &format!("unknown argument `{other}` (try --help)")),
        }
    }
    let source = Source::from_process(path);
    let config = match Config::load(&source, role) {
        Ok(c) => c,
        Err(e) => fail(binary, &e.to_string()),
    };
    if check {
        println!("{}", config.to_masked_json());
        std::process::exit(0);
    }
    Startup { config, source }
}

fn fail(binary: &str, message: &str) -> ! {
    eprintln!("{binary}: {message}");
    std::process::exit(EXIT_CONFIG)
}
