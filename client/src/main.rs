use blog_common::{Service, server};

fn main() -> std::process::ExitCode {
    server::main(Service::Client, client::Config::from_env, |c| c.port, client::run)
}
