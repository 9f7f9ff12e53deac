use blog_common::{Service, server};

fn main() -> std::process::ExitCode {
    server::main(Service::Comments, comments::Config::from_env, |c| c.common.port, comments::run)
}
