use std::process::ExitCode;

use clap::{Parser, Subcommand};
use comfyfleet::bench::BenchArgs;
use comfyfleet::commands::{self, CommandError};
use comfyfleet::config::{ApiArgs, DatabaseArgs, WorkerArgs};
use comfyfleet::dev::DevArgs;
use comfyfleet::sim::SimArgs;

/// comfyfleet: a multi-tenant cloud API for fleets of ComfyUI workers.
#[derive(Parser)]
#[command(name = "comfyfleet", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run everything on one machine with zero configuration (prints URL and credentials).
    Dev(DevArgs),
    /// Run an API pod.
    Api(ApiArgs),
    /// Run a worker pod beside one ComfyUI.
    Worker(WorkerArgs),
    /// Apply database migrations.
    Migrate(DatabaseArgs),
    /// Manage tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Manage API keys.
    #[command(subcommand)]
    Apikey(ApikeyCommand),
    /// Print the OpenAPI spec.
    Openapi,
    /// A ComfyUI-protocol server that simulates execution (tests, demos, load tests).
    Sim(SimArgs),
    /// Load-generate a scenario against an API pod (or nchan) and report the figures.
    Bench(BenchArgs),
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Create a tenant and its first admin user; prints the tenant id.
    Create {
        name: String,
        #[arg(long)]
        admin_email: String,
        #[arg(long, env = "COMFYFLEET_ADMIN_PASSWORD", hide_env_values = true)]
        admin_password: String,
        #[command(flatten)]
        db: DatabaseArgs,
    },
}

#[derive(Subcommand)]
enum ApikeyCommand {
    /// Create an API key; prints only the key.
    Create {
        /// Tenant name or id.
        #[arg(long)]
        tenant: String,
        #[arg(long, default_value = "cli")]
        name: String,
        /// The key may manage keys and users.
        #[arg(long)]
        admin: bool,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Revoke an API key by id.
    Revoke {
        key_id: String,
        #[command(flatten)]
        db: DatabaseArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    comfyfleet::telemetry::init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("comfyfleet: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut stdout = std::io::stdout().lock();
    let result: Result<(), CommandError> = runtime.block_on(async {
        match &cli.command {
            Command::Dev(args) => comfyfleet::dev::run(args, &mut stdout).await,
            Command::Api(args) => commands::api(args).await,
            Command::Worker(args) => commands::worker(args).await,
            Command::Migrate(db) => commands::migrate(db).await,
            Command::Tenant(TenantCommand::Create {
                name,
                admin_email,
                admin_password,
                db,
            }) => commands::tenant_create(db, name, admin_email, admin_password, &mut stdout).await,
            Command::Apikey(ApikeyCommand::Create {
                tenant,
                name,
                admin,
                db,
            }) => commands::apikey_create(db, tenant, name, *admin, &mut stdout).await,
            Command::Apikey(ApikeyCommand::Revoke { key_id, db }) => {
                commands::apikey_revoke(db, key_id, &mut stdout).await
            }
            Command::Openapi => commands::openapi(&mut stdout),
            Command::Sim(args) => commands::sim(args).await,
            Command::Bench(args) => comfyfleet::bench::run(args, &mut stdout).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("comfyfleet: {e}");
            ExitCode::FAILURE
        }
    }
}
