use blog_common::{Service, server};

fn main() -> std::process::ExitCode {
    server::main(Service::Query, query::Config::from_env, |c| c.common.port, query::run)
}
