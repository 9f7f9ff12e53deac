use blog_domain::Service;

fn main() -> std::process::ExitCode {
    blog_kit::service::main(Service::Moderation, moderation::Config::from_env, |c| c.common.port, moderation::run)
}
