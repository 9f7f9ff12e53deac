use blog_common::{Service, server};

fn main() -> std::process::ExitCode {
    server::main(Service::Moderation, moderation::Config::from_env, |c| c.common.port, moderation::run)
}
