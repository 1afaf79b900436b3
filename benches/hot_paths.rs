//! Micro-benchmarks of the hot paths, without the kernel or the network:
//! reading a tar+gzip layer into the content store, merging many layers,
//! random reads through a gzip span index, lookups in a merged tree,
//! content-store read hits, and building an `image.cfs` from a merged tree.
//!
//! `cargo bench --bench hot_paths`

use std::hint::black_box;
use std::io::{Read, Write};

use apt_layer::cas::ObjectStore;
use apt_layer::layer::gzindex::{IndexingDecoder, SpanDecoder};
use apt_layer::layer::stream::{Progress, index_layer};
use apt_layer::layer::{Compression, EntryKind, IndexEntry, LayerIndex};
use apt_layer::rootfs::merge::MergedTree;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// A gzip tar of `files` files of `size` bytes in 20 directories.
fn layer(files: usize, size: usize) -> (Vec<u8>, u64) {
    let mut b = tar::Builder::new(Vec::new());
    for d in 0..20 {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, format!("usr/lib/d{d}/"), std::io::empty())
            .unwrap();
    }
    let mut raw = 0u64;
    for i in 0..files {
        let data: Vec<u8> = (0..size).map(|j| ((i * 31 + j * 7) % 251) as u8).collect();
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(size as u64);
        b.append_data(&mut h, format!("usr/lib/d{}/file{i}", i % 20), &data[..])
            .unwrap();
        raw += size as u64;
    }
    let tar = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).unwrap();
    (gz.finish().unwrap(), raw)
}

fn entry(path: String, kind: EntryKind, n: u64) -> IndexEntry {
    IndexEntry {
        size: n,
        object: (kind == EntryKind::File).then(|| {
            let mut id = [0u8; 32];
            id[..8].copy_from_slice(&n.to_le_bytes());
            id
        }),
        ..IndexEntry::new(path, kind)
    }
}

/// `layers` synthetic layer indexes of `per` files each, over shared dirs.
fn indexes(layers: usize, per: usize) -> Vec<LayerIndex> {
    (0..layers)
        .map(|l| {
            let mut entries: Vec<IndexEntry> = (0..50)
                .map(|d| entry(format!("usr/share/d{d}"), EntryKind::Dir, 0))
                .collect();
            entries.extend((0..per).map(|i| {
                entry(
                    format!("usr/share/d{}/l{l}f{i}", i % 50),
                    EntryKind::File,
                    (l * per + i) as u64,
                )
            }));
            LayerIndex {
                version: apt_layer::layer::INDEX_VERSION,
                digest: format!("sha256:{l:064}"),
                pin: None,
                compression: Compression::Gzip,
                mode: Default::default(),
                compressed_size: 0,
                uncompressed_size: 0,
                entries,
                spans: None,
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let (gz, raw) = layer(2000, 16 << 10);
    let mut g = c.benchmark_group("layer");
    g.throughput(Throughput::Bytes(raw));
    g.sample_size(10);
    g.bench_function("index tar+gzip, 2000 x 16 KiB files", |b| {
        b.iter_batched(
            || tempfile::tempdir().unwrap(),
            |dir| {
                let store = ObjectStore::open(dir.path(), u64::MAX).unwrap();
                let p = Progress::default();
                black_box(
                    index_layer(
                        &gz[..],
                        "sha256:x",
                        Compression::Gzip,
                        gz.len() as u64,
                        &store,
                        &p,
                        None,
                    )
                    .unwrap(),
                );
                dir
            },
            criterion::BatchSize::PerIteration,
        )
    });
    g.finish();

    // Span-index random read: resume at a checkpoint and read 64 KiB from
    // the middle of its span (what refetching an evicted file costs in CPU).
    let (gz, raw) = layer(1000, 64 << 10);
    let mut d = IndexingDecoder::new(&gz[..]).unwrap();
    std::io::copy(&mut d, &mut std::io::sink()).unwrap();
    let spans = d.into_index();
    let mut g = c.benchmark_group("span");
    g.throughput(Throughput::Bytes(64 << 10));
    g.bench_function(
        format!(
            "random 64 KiB read via span index ({} checkpoints, {} MiB)",
            spans.checkpoints.len(),
            raw >> 20
        ),
        |b| {
            let mut k = 0u64;
            b.iter(|| {
                k = (k + 7919 * 4096) % (raw - (64 << 10));
                let cp = spans.locate(k);
                let from = cp.map_or(0, |c| c.fetch_from()) as usize;
                let mut r = SpanDecoder::new(&gz[from..], cp).unwrap();
                let at = r.position();
                std::io::copy(&mut (&mut r).take(k - at), &mut std::io::sink()).unwrap();
                let mut buf = vec![0u8; 64 << 10];
                r.read_exact(&mut buf).unwrap();
                black_box(buf)
            })
        },
    );
    g.finish();

    let idx = indexes(20, 5000);
    let refs: Vec<&LayerIndex> = idx.iter().collect();
    let mut g = c.benchmark_group("merge");
    g.throughput(Throughput::Elements(20 * 5050));
    g.sample_size(10);
    g.bench_function("20 layers x 5000 files", |b| {
        b.iter(|| black_box(MergedTree::build(&refs).unwrap()))
    });
    g.finish();

    let tree = MergedTree::build(&refs).unwrap();
    c.bench_function("lookup usr/share/d7/l3f107 (3 components)", |b| {
        b.iter(|| {
            let mut cur = 0;
            for name in ["usr", "share", "d7", "l3f107"] {
                cur = tree.lookup(cur, black_box(name.as_bytes())).unwrap();
            }
            black_box(cur)
        })
    });
    // What a FUSE getattr of a rootfs inode costs the daemon (the node view
    // with owner, mode and device numbers resolved), without the kernel.
    let n = tree.len() as u32;
    c.bench_function("getattr: node view of a merged-tree inode", |b| {
        let mut i = 0u32;
        b.iter(|| {
            i = (i + 7919) % n;
            black_box(tree.node(black_box(i)))
        })
    });

    // image.cfs of a ~7k-entry tree (a Debian minbase has ~7k entries).
    let idx7k = indexes(1, 7000);
    let tree7k = MergedTree::build(&[&idx7k[0]]).unwrap();
    let inline: std::collections::HashMap<_, _> = tree7k
        .objects()
        .filter(|o| o.2 <= apt_layer::cfs::build::INLINE_MAX)
        .map(|(id, _, size)| (id, vec![b'x'; size as usize].into_boxed_slice()))
        .collect();
    let mut g = c.benchmark_group("image.cfs");
    g.throughput(Throughput::Elements(tree7k.len() as u64));
    g.sample_size(20);
    g.bench_function("build from a 7k-entry tree", |b| {
        b.iter(|| {
            black_box(
                apt_layer::cfs::build::build_image(
                    &tree7k,
                    &inline,
                    &apt_layer::cfs::build::Verity::Off,
                )
                .unwrap(),
            )
        })
    });
    g.finish();

    let dir = tempfile::tempdir().unwrap();
    let store = ObjectStore::open(dir.path(), u64::MAX).unwrap();
    let mut w = store.writer().unwrap();
    w.write_all(&vec![1u8; 64 << 10]).unwrap();
    let (id, _) = w.finish().unwrap();
    c.bench_function("content store read hit (open verified object)", |b| {
        b.iter(|| black_box(store.get(&id).unwrap()))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
