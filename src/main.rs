//! The `apt-layer` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use apt_layer::config::{MountOptions, parse_size};
use apt_layer::daemon;
use apt_layer::inspect::{InspectInput, inspect_json, list_tags_json};
use apt_layer::model::image::{Image, select_platform};
use apt_layer::registry::name::ImageRef;

#[derive(Parser)]
#[command(
    name = "apt-layer",
    version,
    about = "Container registries as a filesystem: ls, cat, chroot into and copy to any image"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Flags every command that talks to registries takes.
#[derive(Args, Clone, Default)]
struct RegistryArgs {
    /// Credentials file (else $REGISTRY_AUTH_FILE, else the containers defaults).
    #[arg(long, value_name = "FILE")]
    authfile: Option<PathBuf>,
    /// registries.conf (v2) to use instead of the system one.
    #[arg(long, value_name = "FILE")]
    registries_conf: Option<PathBuf>,
    /// Reach HOST over plain HTTP (repeatable).
    #[arg(long = "insecure-registry", value_name = "HOST")]
    insecure_registry: Vec<String>,
    /// Seconds before a registry operation fails.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    timeout: u64,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount the registry tree (default /run/apt-layer/registries).
    Mount {
        /// Where to mount.
        mountpoint: Option<PathBuf>,
        /// Cache directory.
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
        /// Cache size bound (e.g. 10G, 512M).
        #[arg(long, value_name = "SIZE")]
        cache_size: Option<String>,
        /// Credentials file.
        #[arg(long, value_name = "FILE")]
        authfile: Option<PathBuf>,
        /// registries.conf (v2).
        #[arg(long, value_name = "FILE")]
        registries_conf: Option<PathBuf>,
        /// Reach HOST over plain HTTP (repeatable).
        #[arg(long = "insecure-registry", value_name = "HOST")]
        insecure_registry: Vec<String>,
        /// Mount options, comma separated (see README).
        #[arg(short = 'o', value_name = "OPTS")]
        options: Vec<String>,
        /// Stay in the foreground, logging to stderr.
        #[arg(long, short = 'f')]
        foreground: bool,
        /// Internal: readiness pipe of the parent.
        #[arg(long, hide = true)]
        ready_fd: Option<i32>,
    },
    /// Print the JSON `skopeo inspect docker://REF` prints.
    Inspect {
        /// Image reference (`registry/repo:tag`, `…@sha256:…`, `docker://` allowed).
        reference: String,
        #[command(flatten)]
        reg: RegistryArgs,
    },
    /// Mount image REF on DIR with the kernel (composefs: its image.cfs as
    /// EROFS under a read-only overlay whose data comes from the cache's
    /// objects). Fetches and verifies every object first; `umount DIR`
    /// undoes it.
    MountImage {
        /// Image reference (`registry/repo:tag`, `…@sha256:…`).
        reference: String,
        /// Where to mount (an existing directory).
        dir: PathBuf,
        /// Cache directory (the one a `mount` uses, to share its objects).
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
        /// Cache size bound (e.g. 10G); a mounted image's objects are kept
        /// even beyond it.
        #[arg(long, value_name = "SIZE")]
        cache_size: Option<String>,
        #[command(flatten)]
        reg: RegistryArgs,
    },
    /// Inspect or maintain the cache.
    Cache {
        #[command(subcommand)]
        cmd: CacheCmd,
        /// Cache directory.
        #[arg(long, value_name = "DIR", global = true)]
        cache_dir: Option<PathBuf>,
        /// Size bound (for `gc`; shown by `stats`).
        #[arg(long, value_name = "SIZE", global = true)]
        cache_size: Option<String>,
    },
    /// Print the JSON `skopeo list-tags docker://REPO` prints.
    ListTags {
        /// Repository (`registry/repo`).
        repository: String,
        #[command(flatten)]
        reg: RegistryArgs,
    },
    /// Push directory DIR as the one-layer image REF, as the outbox does
    /// (prints the manifest digest; exits 0 once the registry has it).
    Export {
        /// The tree to push (its root is the image's root).
        dir: PathBuf,
        /// Where to push (`registry/repo:tag`; the tag defaults to `latest`).
        reference: String,
        #[command(flatten)]
        reg: RegistryArgs,
        /// Where the layer is written while it is pushed (default: $TMPDIR).
        #[arg(long, value_name = "DIR")]
        tmp_dir: Option<PathBuf>,
    },
    /// The outbox of a mount.
    Outbox {
        #[command(subcommand)]
        cmd: OutboxCmd,
        /// Cache directory of the mount.
        #[arg(long, value_name = "DIR", global = true)]
        cache_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum OutboxCmd {
    /// Every staged tag: pending, building, pushing (with progress), pushed
    /// (with the manifest digest) or failed (with the error).
    Status {
        /// Print JSON instead of one line per tag.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CacheCmd {
    /// Counts and sizes, as JSON.
    Stats,
    /// Evict least recently used objects down to --cache-size; remove leftovers.
    Gc,
    /// Hash every object and metadata blob; remove and name the bad ones.
    Verify,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,fuser=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let r = match cli.cmd {
        Cmd::Mount {
            mountpoint,
            cache_dir,
            cache_size,
            authfile,
            registries_conf,
            insecure_registry,
            options,
            foreground,
            ready_fd,
        } => (|| {
            let mut o =
                MountOptions::new(mountpoint.unwrap_or_else(|| "/run/apt-layer/registries".into()));
            for s in &options {
                o.apply_o(s)?;
            }
            if let Some(d) = cache_dir {
                o.cache_dir = d;
            }
            if let Some(s) = cache_size {
                o.cache_size = parse_size(&s)?;
            }
            o.authfile = authfile.or(o.authfile);
            o.registries_conf = registries_conf.or(o.registries_conf);
            o.insecure_registries.extend(insecure_registry);
            daemon::mount(o, foreground, ready_fd)
        })(),
        Cmd::Cache {
            cmd,
            cache_dir,
            cache_size,
        } => cache(cmd, cache_dir, cache_size),
        Cmd::Inspect { reference, reg } => {
            runtime().and_then(|rt| rt.block_on(inspect(&reference, &reg)))
        }
        Cmd::ListTags { repository, reg } => {
            runtime().and_then(|rt| rt.block_on(list_tags(&repository, &reg)))
        }
        Cmd::Export {
            dir,
            reference,
            reg,
            tmp_dir,
        } => runtime().and_then(|rt| rt.block_on(export(&dir, &reference, &reg, tmp_dir))),
        Cmd::MountImage {
            reference,
            dir,
            cache_dir,
            cache_size,
            reg,
        } => runtime()
            .and_then(|rt| rt.block_on(mount_image(&reference, &dir, cache_dir, cache_size, &reg))),
        Cmd::Outbox { cmd, cache_dir } => match cmd {
            OutboxCmd::Status { json } => outbox_status(cache_dir, json),
        },
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("apt-layer: {e}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

fn client(reg: &RegistryArgs) -> Result<apt_layer::registry::RegistryClient, String> {
    daemon::make_client(
        reg.authfile.as_deref(),
        reg.registries_conf.as_deref(),
        &reg.insecure_registry,
        Duration::from_secs(reg.timeout),
    )
}

/// The image `r` names, for this host's platform.
async fn resolve_image(
    c: &apt_layer::registry::RegistryClient,
    r: &ImageRef,
) -> Result<Image, String> {
    let e = |e: apt_layer::registry::RegistryError| e.to_string();
    let wanted = r
        .digest
        .clone()
        .or(r.tag.clone())
        .expect("default tag applied");
    let top = c.manifest(&r.registry, &r.repo, &wanted).await.map_err(e)?;
    let (index, manifest) = if top.is_index {
        let d = select_platform(&top)?;
        let m = c.manifest(&r.registry, &r.repo, &d).await.map_err(e)?;
        (Some(top), m)
    } else {
        (None, top)
    };
    Image::new(index, manifest)
}

async fn inspect(reference: &str, reg: &RegistryArgs) -> Result<(), String> {
    let r = ImageRef::parse(reference, Some("latest"))?;
    let c = client(reg)?;
    let e = |e: apt_layer::registry::RegistryError| e.to_string();
    let image = resolve_image(&c, &r).await?;
    let config = c
        .blob(
            &r.registry,
            &r.repo,
            &image.config.digest,
            apt_layer::registry::MAX_METADATA_SIZE,
        )
        .await
        .map_err(e)?;
    let tags = c.list_tags(&r.registry, &r.repo).await.map_err(e)?;
    let out = inspect_json(&InspectInput {
        name: &r.name(),
        tag: r.tag.as_deref(),
        digest: &image.top_digest,
        repo_tags: &tags,
        manifest: &image.manifest.bytes,
        config: &config,
    })?;
    std::io::Write::write_all(&mut std::io::stdout(), &out).map_err(|e| e.to_string())
}

async fn list_tags(repository: &str, reg: &RegistryArgs) -> Result<(), String> {
    let r = ImageRef::parse(repository, None)?;
    if r.tag.is_some() || r.digest.is_some() {
        return Err(format!(
            "{repository}: list-tags takes a repository, without tag or digest"
        ));
    }
    let c = client(reg)?;
    let tags = c
        .list_tags(&r.registry, &r.repo)
        .await
        .map_err(|e| e.to_string())?;
    std::io::Write::write_all(&mut std::io::stdout(), &list_tags_json(&r.name(), &tags))
        .map_err(|e| e.to_string())
}

fn cache(cmd: CacheCmd, dir: Option<PathBuf>, size: Option<String>) -> Result<(), String> {
    use apt_layer::cas::ObjectStore;
    let dir = dir.unwrap_or_else(|| MountOptions::new(PathBuf::new()).cache_dir);
    if !dir.is_dir() {
        return Err(format!("{} is not a cache directory", dir.display()));
    }
    let limit = size.as_deref().map(parse_size).transpose()?;
    let e = |e: std::io::Error| format!("{}: {e}", dir.display());
    let bound = match cmd {
        CacheCmd::Gc => limit.ok_or("cache gc needs --cache-size")?,
        _ => u64::MAX,
    };
    let objects = ObjectStore::open(&dir, bound).map_err(e)?;
    let meta = apt_layer::store::MetaStore::open(&dir).map_err(e)?;
    let layers = apt_layer::layer::IndexStore::open(&dir).map_err(e)?;
    let stats = |o: &ObjectStore| {
        let s = o.stats();
        serde_json::json!({
            "objects": s.objects,
            "bytes": s.bytes,
            "limit": limit,
            "layers": layers.count(),
            "metadata": meta.count(),
            "pins": o.pins().list().iter().filter(|p| p.2).count(),
        })
    };
    match cmd {
        CacheCmd::Stats | CacheCmd::Gc => {
            if matches!(cmd, CacheCmd::Gc) {
                // Drops pins of images no longer mounted (eviction ran at open).
                let pins = objects.pins();
                if let Ok(l) = pins.lock() {
                    pins.pinned(&l);
                }
            }
            println!(
                "{}",
                serde_json::to_string_pretty(&stats(&objects)).expect("json")
            );
            Ok(())
        }
        CacheCmd::Verify => {
            let mut bad = objects.verify_all();
            bad.extend(meta.verify_all());
            // A daemon started next trusts what was just hashed.
            if let Err(e) = objects.save_verified() {
                eprintln!("warning: cannot save verified stamps: {e}");
            }
            for p in &bad {
                println!("bad: {}", p.display());
            }
            if bad.is_empty() {
                println!(
                    "ok: {} objects, {} metadata blobs verified",
                    objects.stats().objects,
                    meta.count()
                );
                Ok(())
            } else {
                Err(format!(
                    "{} damaged entries removed; they will be fetched again",
                    bad.len()
                ))
            }
        }
    }
}

/// `apt-layer mount-image REF DIR`, with a progress bar on stderr.
async fn mount_image(
    reference: &str,
    dir: &std::path::Path,
    cache_dir: Option<PathBuf>,
    cache_size: Option<String>,
    reg: &RegistryArgs,
) -> Result<(), String> {
    use apt_layer::cfs::mount::{Progress, check_kernel, mount_image};
    use indicatif::{ProgressBar, ProgressStyle};
    use std::sync::Arc;

    struct Bar(ProgressBar);
    impl Progress for Bar {
        fn phase(&self, name: &str, total: u64) {
            self.0.set_message(name.to_string());
            self.0.set_length(total);
            self.0.set_position(0);
        }
        fn advance(&self, done: u64) {
            self.0.set_position(done);
        }
    }

    check_kernel().map_err(|e| e.to_string())?;
    let defaults = MountOptions::new(PathBuf::new());
    let cache = cache_dir.unwrap_or(defaults.cache_dir);
    let limit = match cache_size {
        Some(s) => parse_size(&s)?,
        None => defaults.cache_size,
    };
    std::fs::create_dir_all(&cache).map_err(|e| format!("{}: {e}", cache.display()))?;
    let cache_err = |e: std::io::Error| format!("cache dir {}: {e}", cache.display());
    let r = ImageRef::parse(reference, Some("latest"))?;
    let c = client(reg)?;
    let image = Arc::new(resolve_image(&c, &r).await?);
    let store = Arc::new(apt_layer::cas::ObjectStore::open(&cache, limit).map_err(cache_err)?);
    let indexes = apt_layer::layer::IndexStore::open(&cache).map_err(cache_err)?;
    let layers = apt_layer::rootfs::Layers::new(c, store, indexes);
    let rf = apt_layer::rootfs::Rootfs::new(
        0,
        r.registry.as_str().into(),
        r.repo.as_str().into(),
        image,
    );
    let pb = ProgressBar::new(0).with_style(
        ProgressStyle::with_template(
            "{msg:8} [{bar:40.cyan/blue}] {bytes:>10}/{total_bytes:10} {bytes_per_sec:>12} {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let done = mount_image(&cache, &layers, &rf, dir, &Bar(pb.clone())).await;
    pb.finish_and_clear();
    let m = done.map_err(|e| e.to_string())?;
    eprintln!(
        "mounted {}@{} on {}: {} entries, {} objects ({} fetched again), {}",
        r.name(),
        m.manifest,
        dir.display(),
        m.entries,
        m.objects,
        m.refetched,
        if m.verity {
            "fs-verity required"
        } else {
            "without fs-verity (the cache's filesystem has none): objects were verified before mounting"
        }
    );
    Ok(())
}

/// `apt-layer export DIR REF`: the outbox's push, from the command line,
/// with a progress bar on stderr.
async fn export(
    dir: &std::path::Path,
    reference: &str,
    reg: &RegistryArgs,
    tmp_dir: Option<PathBuf>,
) -> Result<(), String> {
    use apt_layer::outbox::{layer, push};
    use indicatif::{ProgressBar, ProgressStyle};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

    let r = ImageRef::parse(reference, Some("latest"))?;
    if r.digest.is_some() {
        return Err(format!("{reference}: export pushes to a tag, not a digest"));
    }
    let tag = r.tag.clone().expect("default tag applied");
    if !dir.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    let c = client(reg)?;
    let tmp = tmp_dir.unwrap_or_else(std::env::temp_dir);
    let pb = ProgressBar::new(0).with_style(
        ProgressStyle::with_template(
            "{msg:8} [{bar:40.cyan/blue}] {bytes:>10}/{total_bytes:10} {bytes_per_sec:>12} {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );

    pb.set_message("layer");
    let progress = Arc::new(layer::LayerProgress::default());
    let ticker = {
        let (pb, progress) = (pb.clone(), progress.clone());
        tokio::spawn(async move {
            loop {
                pb.set_length(progress.total.load(Relaxed));
                pb.set_position(progress.read.load(Relaxed));
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        })
    };
    let (src, tmp2, prog) = (dir.to_path_buf(), tmp.clone(), progress.clone());
    let built = tokio::task::spawn_blocking(move || layer::build(&src, &tmp2, &prog))
        .await
        .map_err(|e| e.to_string())?;
    ticker.abort();
    let built = built.map_err(|e| format!("writing the layer: {e}"))?;
    pb.set_position(progress.read.load(Relaxed));

    let sent = Arc::new(AtomicU64::new(0));
    let ticker = {
        let (pb, sent) = (pb.clone(), sent.clone());
        tokio::spawn(async move {
            loop {
                if pb.message() == "upload" {
                    pb.set_position(sent.load(Relaxed));
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        })
    };
    let step = |name: &str, total: u64| {
        pb.set_message(name.to_string());
        pb.set_length(total);
        pb.set_position(0);
    };
    let pushed = push::push_image(&c, &r.registry, &r.repo, &tag, &built, &[], &sent, &step).await;
    ticker.abort();
    pb.finish_and_clear();
    let pushed = pushed.map_err(|e| e.to_string())?;
    eprintln!(
        "pushed {}:{tag} {} (layer {}, {} bytes, {})",
        r.name(),
        pushed.manifest,
        pushed.layer,
        pushed.layer_size,
        pushed.layer_source
    );
    println!("{}", pushed.manifest);
    Ok(())
}

/// `apt-layer outbox status`: what the daemon's state files say.
fn outbox_status(cache_dir: Option<PathBuf>, json: bool) -> Result<(), String> {
    use apt_layer::outbox::status;
    let cache = cache_dir.unwrap_or_else(|| MountOptions::new(PathBuf::new()).cache_dir);
    let dir = cache.join("outbox").join("state");
    if !dir.is_dir() {
        return Err(format!("no outbox in {}", cache.display()));
    }
    let (states, bad) = status::load_all(&dir);
    let general: serde_json::Value = std::fs::read(dir.join("outbox.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| serde_json::json!({}));
    if json {
        let v = serde_json::json!({
            "tags": states,
            "unpushable": general.get("unpushable").cloned().unwrap_or_default(),
            "staging_error": general.get("undecided_error").cloned().unwrap_or_default(),
            "unreadable": bad.iter().map(|(p, e)| format!("{}: {e}", p.display())).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        return Ok(());
    }
    for s in &states {
        println!("{}", s.line());
    }
    for u in general
        .get("unpushable")
        .and_then(|u| u.as_array())
        .into_iter()
        .flatten()
    {
        println!(
            "unpushable {}  {}",
            u["path"].as_str().unwrap_or("?"),
            u["reason"].as_str().unwrap_or("")
        );
    }
    if let Some(e) = general.get("undecided_error").and_then(|e| e.as_str()) {
        println!("staging error: {e}");
    }
    for (p, e) in &bad {
        println!("unreadable state {}: {e}", p.display());
    }
    if states.is_empty() {
        eprintln!("(no staged tags)");
    }
    Ok(())
}
