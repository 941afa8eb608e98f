//! `daisi-loadtest`: see `daisi-loadtest --help` and docs/BENCHMARKS.md.
#![forbid(unsafe_code)]

fn main() {
    std::process::exit(daisi_loadtest::cli::main(std::env::args().skip(1).collect()));
}
