//! `daisi-dev-stack`: the whole local stack in one command (see the crate docs
//! and `--help`). Exit code 0 after a clean Ctrl-C/SIGTERM stop, 1 when
//! something failed, 2 on a bad argument.
#![forbid(unsafe_code)]

use daisi_dev_stack::args::{self, Parsed};

#[tokio::main]
async fn main() {
    let args = match args::parse(std::env::args().skip(1)) {
        Ok(Parsed::Run(a)) => a,
        Ok(Parsed::Help) => {
            println!("{}", args::USAGE);
            return;
        }
        Ok(Parsed::PublishHelp) => {
            println!("{}", args::PUBLISH_USAGE);
            return;
        }
        Ok(Parsed::Publish(p)) => match daisi_dev_stack::publisher::publish_one(&p).await {
            Ok(seq) => {
                println!("published to {} (stream seq {seq})", p.subject);
                return;
            }
            Err(e) => {
                eprintln!("daisi-dev-stack publish: {e}");
                std::process::exit(1);
            }
        },
        Err(e) => {
            eprintln!("daisi-dev-stack: {e}");
            std::process::exit(2);
        }
    };
    let code = daisi_dev_stack::stack::run(args).await;
    std::process::exit(code);
}
