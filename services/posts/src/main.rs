use blog_common::{Service, server};

fn main() -> std::process::ExitCode {
    server::main(Service::Posts, posts::Config::from_env, |c| c.common.port, posts::run)
}
