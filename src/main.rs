//! The `byokd` command: serve, manage keys and tokens, check config.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use zeroize::Zeroizing;

use byokd::config::{Config, DEFAULT_CONFIG_PATH, parse_duration};
use byokd::keys::PlainKey;
use byokd::keys::manage::{self, NewKey};
use byokd::keys::transfer;

#[derive(Parser)]
#[command(
    name = "byokd",
    version,
    about = "Bring-your-own-key sidecar proxy for LLM APIs"
)]
struct Cli {
    /// Config file.
    #[arg(long, global = true, env = "BYOKD_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy (data listener) and the admin listener.
    Serve {
        /// Data listener address (overrides `listen`).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Admin listener address (overrides `admin.listen`).
        #[arg(long)]
        admin_listen: Option<SocketAddr>,
    },
    /// Register, list and revoke provider keys. Secrets are read from stdin, never argv.
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// Local key-encryption keys.
    Kek {
        #[command(subcommand)]
        cmd: KekCmd,
    },
    /// Platform tokens: the API key an app sends to byokd to name its tenant.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Configuration.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Register a key: `echo -n "$KEY" | byokd keys add --tenant acme --provider openai`.
    Add {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        provider: String,
        #[arg(long)]
        label: Option<String>,
        /// Expiry, e.g. 90d.
        #[arg(long, value_parser = parse_duration)]
        expires_in: Option<Duration>,
        /// Check the key with one live call to the provider (list models) before storing it.
        #[arg(long)]
        verify: bool,
    },
    /// List keys, masked.
    List {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Replace the tenant's key for a provider with a new secret (stdin): the new version
    /// serves new requests at once, in-flight ones finish on the old, which is retired.
    Rotate {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        provider: String,
        /// Which key, when the tenant holds several for the provider (a key pool).
        #[arg(long)]
        key_id: Option<String>,
        #[arg(long)]
        verify: bool,
    },
    /// Revoke every version of a key.
    Revoke { key_id: String },
    /// Re-wrap every record's data key under the active KEK (after a master-key rotation),
    /// one record at a time; safe while `serve` runs.
    Rewrap,
    /// Write every sealed record (ciphertext, wrapped data keys, token hashes; never a key in
    /// the clear) to stdout as JSON lines: a backup, or the first half of a move.
    Export,
    /// Read an export from stdin into this config's store, in one write.
    Import {
        /// The config that sealed the records: each data key is unwrapped by its KMS or KEK
        /// and wrapped by this config's. Without it, every record must already unwrap here.
        #[arg(long)]
        from_config: Option<std::path::PathBuf>,
        /// Skip records the store already holds, instead of refusing the whole import.
        #[arg(long)]
        skip_existing: bool,
    },
}

#[derive(Subcommand)]
enum KekCmd {
    /// Write a new 32-byte KEK file (0600). Refuses to overwrite.
    Generate {
        /// Where to write it; defaults to the active KEK path from the config.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Issue a platform token for a tenant; printed once, stored as SHA-256.
    New {
        #[arg(long)]
        tenant: String,
    },
    /// Revoke a platform token by id.
    Revoke { token_id: String },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Parse and validate the config file.
    Check,
}

/// Logs go through a background writer so a slow stderr (a backed-up log pipe) never blocks a
/// worker thread mid-request. It is not lossy: past 4,096 queued messages, callers wait rather
/// than drop audit events. A message is a line or a 16 KiB batch of access lines, so the
/// queue holds up to 64 MiB of log; the default 128k slots cost 4 MiB of memory up front and
/// would let a stalled stderr queue 2 GiB. The guard flushes the queue at exit.
fn init_tracing(serving: bool) -> tracing_appender::non_blocking::WorkerGuard {
    use tracing_subscriber::EnvFilter;
    // CLI commands print their result on stdout; stderr gets warnings and the audit trail.
    let default = if serving {
        "info"
    } else {
        "warn,byokd::audit=info"
    };
    let filter = EnvFilter::try_from_env("BYOKD_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    // aws-sigv4 logs the canonical request at debug level, which holds a session token in the
    // clear: never let it through, whatever BYOKD_LOG asks for.
    let filter = match "aws_sigv4=off".parse() {
        Ok(d) => filter.add_directive(d),
        Err(_) => filter,
    };
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(4096)
        .finish(std::io::stderr());
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_target(true)
        .with_env_filter(filter)
        .with_writer(writer.clone())
        .init();
    if serving {
        byokd::access_log::install(writer);
    }
    guard
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let _log_guard = init_tracing(matches!(cli.cmd, Cmd::Serve { .. }));
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .and_then(|rt| rt.block_on(run(cli)));
    // Access lines still in their batch buffers go out before the log writer's last flush.
    byokd::access_log::flush();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the cause chain on one line, without a backtrace.
            eprintln!("byokd: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let load = || Config::load(&cli.config).map_err(anyhow::Error::from);
    match cli.cmd {
        Cmd::Serve {
            listen,
            admin_listen,
        } => {
            let mut cfg = load()?;
            if let Some(a) = listen {
                cfg.listen = a;
            }
            if let Some(a) = admin_listen {
                cfg.admin_listen = a;
            }
            serve(cfg).await
        }
        Cmd::Config {
            cmd: ConfigCmd::Check,
        } => {
            let cfg = load()?;
            println!(
                "{}: ok ({} providers, {} tenant overrides)",
                cfg.path.display(),
                cfg.providers.len(),
                cfg.tenants.len()
            );
            Ok(())
        }
        Cmd::Keys { cmd } => keys(load()?, cmd).await,
        Cmd::Kek {
            cmd: KekCmd::Generate { out },
        } => {
            let cfg = load()?;
            let path = match out {
                Some(p) => p,
                None => match &cfg.kms {
                    byokd::config::KmsConfig::Local { keks, active } => keks
                        .iter()
                        .find(|(id, _)| id == active)
                        .map(|(_, p)| p.clone())
                        .context("the active KEK has no path")?,
                    byokd::config::KmsConfig::Aws(_) => bail!(
                        "kms.aws is configured: rotate the master key in AWS KMS (a new key id), \
                         then run `byokd keys rewrap`; or pass --out for a local KEK file"
                    ),
                },
            };
            byokd::keys::kms::create_kek_file(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            println!("wrote a new 32-byte KEK to {} (mode 0600)", path.display());
            println!(
                "add it under kms.local.keks with a new id, make it `active`, then run `byokd keys rewrap`"
            );
            Ok(())
        }
        Cmd::Token { cmd } => {
            let cfg = load()?;
            let store = byokd::server::store(&cfg).await?;
            let audit = byokd::server::audit(&cfg);
            match cmd {
                TokenCmd::New { tenant } => {
                    let (token, rec) = manage::new_token(store.as_ref(), &audit, &tenant).await?;
                    eprintln!(
                        "token {} for tenant {}: shown once, store it now",
                        rec.id, rec.tenant
                    );
                    println!("{}", token.as_str());
                }
                TokenCmd::Revoke { token_id } => {
                    manage::revoke_token(store.as_ref(), &audit, &token_id).await?;
                    println!("revoked {token_id}");
                }
            }
            Ok(())
        }
    }
}

fn provider(cfg: &Config, name: &str) -> Result<std::sync::Arc<byokd::provider::Provider>> {
    cfg.provider_index(name)
        .map(|i| cfg.providers[i].clone())
        .with_context(|| format!("unknown provider `{name}`"))
}

/// The live check of `--verify`, through the same upstream client `serve` uses.
async fn verify(cfg: &Config, p: &byokd::provider::Provider, secret: &PlainKey) -> Result<()> {
    let upstream = byokd::forward::Upstream::new(&cfg.upstream, &cfg.limits)?;
    byokd::verify::verify_key(&upstream, p, secret.expose().trim()).await?;
    eprintln!("verified: {} accepted the key", p.name);
    Ok(())
}

async fn keys(cfg: Config, cmd: KeysCmd) -> Result<()> {
    // Every key command, even one that never unwraps (`list`), refuses a KEK others can read.
    if let byokd::config::KmsConfig::Local { keks, .. } = &cfg.kms {
        byokd::keys::kms::check_kek_files(keks)?;
    }
    let store = byokd::server::store(&cfg).await?;
    let store = store.as_ref();
    let audit = byokd::server::audit(&cfg);
    match cmd {
        KeysCmd::Add {
            tenant,
            provider: name,
            label,
            expires_in,
            verify: check,
        } => {
            let p = provider(&cfg, &name)?;
            let secret = read_secret()?;
            manage::check_new_key(&tenant, &p, secret.expose().trim())?;
            if check {
                verify(&cfg, &p, &secret).await?;
            }
            let kms = byokd::server::kms(&cfg)?;
            let rec = manage::add_key(
                store,
                kms.as_ref(),
                &audit,
                NewKey {
                    tenant: &tenant,
                    provider: &p,
                    secret: &secret,
                    label,
                    expires_in,
                },
            )
            .await?;
            println!("{} {} {} {}", rec.id, rec.tenant, rec.provider, rec.masked);
            Ok(())
        }
        KeysCmd::Rotate {
            tenant,
            provider: name,
            key_id,
            verify: check,
        } => {
            let p = provider(&cfg, &name)?;
            let mut pool = manage::active_keys(store, &tenant, &name).await?;
            // With a key pool, rotating "the" key would silently pick one: name it instead.
            let current = match key_id {
                Some(id) => pool.into_iter().find(|r| r.id == id).with_context(|| {
                    format!("tenant {tenant} has no active {name} key with id {id}")
                })?,
                None if pool.len() > 1 => {
                    let ids: Vec<&str> = pool.iter().map(|r| r.id.as_str()).collect();
                    anyhow::bail!(
                        "tenant {tenant} has {} active {name} keys (a key pool): name one with --key-id ({})",
                        pool.len(),
                        ids.join(", ")
                    );
                }
                None => pool.pop().with_context(|| {
                    format!("tenant {tenant} has no active {name} key to rotate")
                })?,
            };
            let secret = read_secret()?;
            manage::check_new_key(&tenant, &p, secret.expose().trim())?;
            if check {
                verify(&cfg, &p, &secret).await?;
            }
            let kms = byokd::server::kms(&cfg)?;
            let rec =
                manage::rotate_key(store, kms.as_ref(), &audit, &current.id, &p, &secret).await?;
            println!(
                "{} {} {} {} v{} (v{} retired)",
                rec.id, rec.tenant, rec.provider, rec.masked, rec.version, current.version
            );
            Ok(())
        }
        KeysCmd::Rewrap => {
            let kms = byokd::server::kms(&cfg)?;
            let r = manage::rewrap(store, kms.as_ref(), &audit).await?;
            println!(
                "rewrapped {}, already current {}, failed {}",
                r.rewrapped, r.current, r.failed
            );
            if r.failed > 0 {
                bail!(
                    "{} record(s) could not be re-wrapped; see the log and run again",
                    r.failed
                );
            }
            Ok(())
        }
        KeysCmd::Export => {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let (k, t) =
                transfer::export(store, &audit, &mut out, byokd::vocab::unix_now()).await?;
            eprintln!("exported {k} key versions and {t} tokens");
            Ok(())
        }
        KeysCmd::Import {
            from_config,
            skip_existing,
        } => {
            let source = match from_config {
                Some(path) => {
                    let src = Config::load(&path)?;
                    // A missing source KEK must fail here, not be created empty.
                    if let byokd::config::KmsConfig::Local { keks, .. } = &src.kms {
                        for (id, p) in keks {
                            anyhow::ensure!(
                                p.exists(),
                                "the source config's KEK `{id}` ({}) does not exist",
                                p.display()
                            );
                        }
                    }
                    Some(byokd::server::kms(&src)?)
                }
                None => None,
            };
            let kms = byokd::server::kms(&cfg)?;
            let dup = if skip_existing {
                transfer::Duplicates::Skip
            } else {
                transfer::Duplicates::Refuse
            };
            let r = transfer::import(
                store,
                kms.as_ref(),
                source.as_deref(),
                &audit,
                &mut std::io::stdin().lock(),
                dup,
            )
            .await?;
            println!(
                "imported {} key versions and {} tokens ({} re-wrapped, {} already there and skipped)",
                r.keys, r.tokens, r.rewrapped, r.skipped
            );
            Ok(())
        }
        KeysCmd::List { tenant, json } => {
            let list = manage::list_keys(store, tenant.as_deref()).await?;
            if json {
                let rows: Vec<_> = list.iter().map(key_json).collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<22} {:<20} {:<11} {:>3} {:<8} {:<14} {:<20} LABEL",
                    "ID", "TENANT", "PROVIDER", "VER", "STATE", "KEY", "EXPIRES"
                );
                for r in &list {
                    println!(
                        "{:<22} {:<20} {:<11} {:>3} {:<8} {:<14} {:<20} {}",
                        r.id,
                        r.tenant,
                        r.provider,
                        r.version,
                        format!("{:?}", r.state).to_lowercase(),
                        r.masked,
                        r.expires_at.map_or_else(String::new, |e| e.to_string()),
                        r.label.as_deref().unwrap_or("")
                    );
                }
            }
            Ok(())
        }
        KeysCmd::Revoke { key_id } => {
            let n = manage::revoke_key(store, &audit, &key_id).await?;
            println!("revoked {key_id} ({n} version(s))");
            Ok(())
        }
    }
}

fn key_json(r: &byokd::keys::store::KeyRecord) -> serde_json::Value {
    byokd::keys::store::public_json(r)
}

/// The secret from stdin: one line, trailing newline dropped. Refuses a terminal-less empty read.
fn read_secret() -> Result<PlainKey> {
    let mut buf = Zeroizing::new(String::new());
    std::io::stdin()
        .read_to_string(&mut buf)
        .context("cannot read the key from stdin")?;
    let key = buf.trim();
    if key.is_empty() {
        bail!("no key on stdin: pipe it in, e.g. `printf %s \"$KEY\" | byokd keys add ...`");
    }
    Ok(PlainKey::new(key.to_string()))
}

async fn serve(cfg: Config) -> Result<()> {
    let running = byokd::server::start(cfg).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt: draining"),
    }
    running.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}
