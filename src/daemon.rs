//! `apt-layer mount`: build the tree, mount it, serve until unmounted.
//!
//! Readiness contract: `mount` (without `--foreground`) returns only once
//! the kernel has completed the FUSE handshake, i.e. the tree is served. It
//! re-executes itself in the foreground in a new session with a pipe; the
//! child writes `ok` to the pipe after the handshake, or its error, and the
//! parent exits 0 or reports that error.
//!
//! Shutdown: `umount`, SIGTERM, SIGINT or SIGHUP end the session; the daemon
//! unmounts (if needed), finishes storing layers whose download is over (at
//! most `STORING_GRACE`), lets other in-flight work finish briefly and
//! exits 0, saving the verified stamps (also saved every `STAMPS_PERIOD`
//! while objects are being verified).

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fuser::{Config, MountOption, SessionACL};

use crate::config::{AuthFile, MountOptions, RegistriesConf};
use crate::fuse::Fs;
use crate::model::Tree;
use crate::model::tree::TreeOptions;
use crate::registry::RegistryClient;
use crate::store::MetaStore;

/// How long an exiting daemon waits for layers that were downloaded and
/// listed to be stored (their indexes saved), so that the next start does
/// not fetch them again.
const STORING_GRACE: Duration = Duration::from_secs(30);

/// How often the verified stamps are saved while objects are being
/// verified ([`crate::cas::ObjectStore::save_verified_if_new`]).
const STAMPS_PERIOD: Duration = Duration::from_secs(5);

/// Loads auth and registries.conf and builds the shared registry client.
pub fn make_client(
    authfile: Option<&Path>,
    registries_conf: Option<&Path>,
    insecure: &[String],
    timeout: Duration,
) -> Result<RegistryClient, String> {
    let auth = AuthFile::load(authfile)?;
    let mut conf = RegistriesConf::load(registries_conf)?;
    for h in insecure {
        conf.add_insecure(h);
    }
    RegistryClient::new(conf, auth, timeout)
}

/// Runs `apt-layer mount`. `ready_fd` is the pipe of a parent waiting for
/// readiness (internal).
pub fn mount(opts: MountOptions, foreground: bool, ready_fd: Option<i32>) -> Result<(), String> {
    if !foreground {
        return daemonize(&opts);
    }
    let mut ready = ready_fd.map(|fd| {
        // SAFETY: the parent passed us this fd for exactly this purpose.
        std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) })
    });
    let result = serve(&opts, &mut ready);
    if let (Err(e), Some(r)) = (&result, ready.as_mut()) {
        let _ = writeln!(r, "{e}");
    }
    result
}

/// Raises the soft limit of open files to the hard limit: the outbox keeps
/// one `O_PATH` descriptor per inode the kernel holds, and every open file
/// of a rootfs keeps its object open (on `-o ro` mounts too), as do the
/// opens the FUSE layer keeps after release. Returns the soft limit now in
/// force (0 if it cannot be read).
pub fn raise_fd_limit() -> u64 {
    // SAFETY: plain getrlimit/setrlimit on a zeroed struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        if r.rlim_cur < r.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
        r.rlim_cur
    }
}

fn serve(opts: &MountOptions, ready: &mut Option<std::fs::File>) -> Result<(), String> {
    let fd_limit = raise_fd_limit();
    // One malloc arena: streaming a layer churns through buffers on several
    // threads, and per-thread arenas kept that churn as RSS (measured: ~5.7
    // KB per image entry with the default arenas, ~0.6 KB with one).
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt is called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    let client = make_client(
        opts.authfile.as_deref(),
        opts.registries_conf.as_deref(),
        &opts.insecure_registries,
        opts.timeout,
    )?;
    std::fs::create_dir_all(&opts.cache_dir)
        .map_err(|e| format!("cannot create cache dir {}: {e}", opts.cache_dir.display()))?;
    let meta = MetaStore::open(&opts.cache_dir)
        .map_err(|e| format!("cache dir {}: {e}", opts.cache_dir.display()))?;
    let mut configured: Vec<String> = client.conf().registries().map(str::to_string).collect();
    configured.extend(client.auth().registries().map(str::to_string));
    configured.extend(opts.insecure_registries.iter().cloned());
    configured.retain(|r| crate::registry::name::is_registry(r));
    let cache_err = |e: std::io::Error| format!("cache dir {}: {e}", opts.cache_dir.display());
    let objects = crate::cas::ObjectStore::open_shared(&opts.cache_dir, opts.cache_size)
        .map_err(cache_err)?;
    let indexes = crate::layer::IndexStore::open(&opts.cache_dir).map_err(cache_err)?;
    let images =
        Arc::new(crate::cfs::images::ImageStore::open(&opts.cache_dir).map_err(cache_err)?);
    let layers = Arc::new(crate::rootfs::Layers::new(client.clone(), objects, indexes));
    layers.set_background(opts.background);
    layers.set_early(opts.early);
    let outbox = if opts.read_only {
        None
    } else {
        Some(
            crate::outbox::Outbox::load(&opts.cache_dir, client.clone(), opts.outbox_settle)
                .map_err(|e| format!("outbox in {}: {e}", opts.cache_dir.display()))?,
        )
    };
    let tree = Arc::new(Tree::new(
        client,
        meta,
        images,
        layers,
        TreeOptions {
            tag_ttl: opts.tag_ttl,
            configured,
        },
    ));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .thread_name("apt-layer-io")
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;

    if !opts.tree_idle.is_zero() {
        let (tree, idle) = (tree.clone(), opts.tree_idle);
        let period = (idle / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
        rt.spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                tree.unload_idle_trees(idle);
            }
        });
    }

    {
        // Whatever this daemon verifies is saved within a few seconds, so a
        // daemon killed later (not stopped, which saves too) still spares
        // the next start from hashing those objects again. A save that
        // fails (a full disk) is tried again at the next tick, and logged
        // once until one succeeds.
        let store = tree.layers().store().clone();
        rt.spawn(async move {
            let mut tick = tokio::time::interval(STAMPS_PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            loop {
                tick.tick().await;
                let store = store.clone();
                match tokio::task::spawn_blocking(move || store.save_verified_if_new()).await {
                    Ok(Ok(Some(n))) => {
                        tracing::debug!(objects = n, "verified stamps saved");
                        failing = false;
                    }
                    Ok(Err(e)) if !failing => {
                        tracing::warn!(error = %e, "cannot save verified stamps; trying again every few seconds");
                        failing = true;
                    }
                    _ => {}
                }
            }
        });
    }

    if let Some(outbox) = &outbox {
        // outbox/ is served by the outbox; a push makes the registry view
        // forget its cached tag list of that repository.
        let ob = outbox.clone();
        tree.set_outbox_root(Box::new(move || ob.root_entry()));
        let weak_tree = Arc::downgrade(&tree);
        outbox.on_pushed(Box::new(move |registry, repo| {
            if let Some(t) = weak_tree.upgrade() {
                t.forget_tags(registry, repo);
            }
        }));
        outbox.start(rt.handle());
    }

    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::FSName("apt-layer".into()),
        MountOption::CUSTOM("subtype=apt-layer".into()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
    ];
    if opts.read_only {
        cfg.mount_options.push(MountOption::RO);
    }
    cfg.mount_options.push(if opts.suid {
        MountOption::Suid
    } else {
        MountOption::NoSuid
    });
    cfg.mount_options.push(if opts.dev {
        MountOption::Dev
    } else {
        MountOption::NoDev
    });
    cfg.acl = if opts.allow_other {
        SessionACL::All
    } else if opts.allow_root {
        SessionACL::RootAndOwner
    } else {
        SessionACL::Owner
    };
    cfg.n_threads = Some(opts.threads.max(1));
    cfg.clone_fd = true;

    std::fs::create_dir_all(&opts.mountpoint).ok();
    let layers = tree.layers().clone();
    let mut fs = Fs::new(tree, rt.handle().clone()).with_kept_opens(fd_limit);
    if let Some(outbox) = outbox {
        fs = fs.with_outbox(outbox);
    }
    if !opts.passthrough {
        fs = fs.without_passthrough();
    }
    let mut session = fuser::Session::new(fs, &opts.mountpoint, &cfg)
        .map_err(|e| format!("cannot mount {}: {e}", opts.mountpoint.display()))?;
    tracing::info!(mountpoint = %opts.mountpoint.display(), cache = %opts.cache_dir.display(), "serving");
    if let Some(mut r) = ready.take() {
        let _ = r.write_all(b"ok\n");
    }

    let mut unmounter = session.unmount_callable();
    rt.spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (mut t, mut i, mut h) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(t), Ok(i), Ok(h)) => (t, i, h),
            _ => return,
        };
        tokio::select! { _ = t.recv() => {}, _ = i.recv() => {}, _ = h.recv() => {} }
        tracing::info!("signal received; unmounting");
        if let Err(e) = unmounter.unmount() {
            tracing::warn!(error = %e, "unmount failed");
        }
    });
    let res = session.run();
    rt.block_on(layers.finish_storing(STORING_GRACE));
    // The next start trusts the objects verified here while their files
    // stay as they are, instead of hashing each again on first open.
    match layers.store().save_verified() {
        Ok(n) => tracing::info!(objects = n, "verified stamps saved"),
        Err(e) => tracing::warn!(error = %e, "cannot save verified stamps"),
    }
    rt.shutdown_timeout(Duration::from_secs(2));
    match res {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {}
        Err(e) => tracing::debug!(error = %e, "session ended"),
    }
    tracing::info!("unmounted; exiting");
    Ok(())
}

/// Re-executes in the foreground in a new session, and waits for it to
/// report readiness (or failure) through a pipe.
fn daemonize(opts: &MountOptions) -> Result<(), String> {
    let mut fds = [0i32; 2];
    // SAFETY: fds is a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: pipe2 just returned these two fds to us.
    let (mut rd, wr) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            OwnedFd::from_raw_fd(fds[1]),
        )
    };
    let log_path = opts
        .log_file
        .clone()
        .unwrap_or_else(|| opts.cache_dir.join("apt-layer.log"));
    if let Some(dir) = log_path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("cannot open log {}: {e}", log_path.display()))?;
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    args.push("--foreground".into());
    args.push("--ready-fd".into());
    args.push("3".into());
    let wr_fd = std::os::fd::AsRawFd::as_raw_fd(&wr);
    let mut cmd = std::process::Command::new(exe);
    cmd.args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
    // SAFETY: only async-signal-safe calls (setsid, dup2) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if libc::dup2(wr_fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start daemon: {e}"))?;
    drop(wr);
    let mut msg = String::new();
    let _ = rd.read_to_string(&mut msg);
    if msg.starts_with("ok") {
        return Ok(());
    }
    let _ = child.wait();
    let msg = msg.trim();
    Err(if msg.is_empty() {
        format!("daemon exited before serving; see {}", log_path.display())
    } else {
        format!("{msg} (log: {})", log_path.display())
    })
}
