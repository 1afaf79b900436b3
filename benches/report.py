"""Turns the measurements benches/e2e.sh exported into BENCHMARKS.md and an SVG chart."""
import os
import statistics as st


def nums(name):
    return [float(x) for x in os.environ.get("M_" + name, "").split()]


def med(xs):
    return statistics_or_nan(st.median, xs)


def statistics_or_nan(f, xs):
    return f(xs) if xs else float("nan")


def ratios(a, b):
    """Per-round ratios a/b (rounds alternate, so pair them)."""
    return [x / y for x, y in zip(nums(a), nums(b)) if y > 0]


def cell(rs):
    if not rs:
        return "n/a"
    if len(rs) == 1:
        return f"{rs[0]:.3f}x"
    return f"{st.median(rs):.3f}x ({min(rs):.3f}–{max(rs):.3f})"


def verdict(rs, limit):
    if not rs:
        return "not measured"
    return "met" if st.median(rs) <= limit else "**missed**"


rows = []
cold = ratios("C_AL", "C_BASE")
rows.append(("cold first read + `chroot /bin/true`, gzip, vs skopeo copy + umoci unpack", cell(cold), "≤ 0.12x", verdict(cold, 0.12)))
cold_esz = ratios("C_ESZ", "C_BASE")
rows.append(("same, eStargz image (ctr-remote convert), vs skopeo copy + umoci unpack of the gzip image", cell(cold_esz), "≤ 0.12x", verdict(cold_esz, 0.12)))
cold_zch = ratios("C_ZCH", "C_BASE")
rows.append(("same, zstd:chunked image, vs skopeo copy + umoci unpack of the gzip image", cell(cold_zch), "≤ 0.12x", verdict(cold_zch, 0.12)))
rat = ratios("C_RAT", "C_BASE")
rows.append(("(reference) ratarmount: download + index + read + chroot, vs skopeo copy + umoci unpack", cell(rat), "—", "—"))
al_rat = ratios("C_AL", "C_RAT")
rows.append(("cold start gzip, apt-layer vs ratarmount", cell(al_rat), "—", "—"))
first = ratios("F_AL", "C_BASE")
rows.append(("cold first read alone (`cat etc/os-release`, answered while the layer streams), gzip, vs skopeo copy + umoci unpack", cell(first), "—", "—"))
layer = float(os.environ["LAYER_SIZE"])
fetched = [b / layer for b in nums("BYTES")]
rows.append(("bytes fetched for that cold start / layer size, gzip (streamed)", cell(fetched).replace("x", ""), "(whole layer)", "—"))
for tag, name in (("ESZ", "estargz"), ("ZCH", "zstdchunked")):
    size = float(os.environ.get("SIZE_" + name) or "nan")
    fr = [b / size for b in nums("B_" + tag)]
    rows.append((f"bytes fetched for that cold start / layer size, {name}", cell(fr).replace("x", ""), "≤ 0.10", verdict(fr, 0.10)))
for tag, name in (("AL", "gzip"), ("ESZ", "eStargz"), ("ZCH", "zstd:chunked")):
    rs = ratios("S_" + tag, "S_BASE")
    rows.append((f"cold start over a 100 Mbit/s link (tbf), {name}, vs skopeo copy + umoci unpack", cell(rs), "—", "—"))
idx = nums("IDX_FRAC")
rows.append(("layer index incl. gzip span checkpoints / uncompressed size", f"{med(idx) * 100:.2f}%" if idx else "n/a", "≤ 1% (spans)", "met" if idx and med(idx) <= 0.01 else "**missed**"))
refetch = nums("REFETCH")
rows.append(("bytes fetched per evicted file read again (gzip, span index; mean of 20 files)", f"{med(refetch) / 2**20:.2f} MiB" if refetch else "n/a", "≤ 8 MiB", "met" if refetch and med(refetch) <= 8 * 2**20 else "**missed**"))
tar = ratios("W_TAR_AL", "W_TAR_NAT")
rows.append(("warm `tar cf - rootfs`, vs local disk", cell(tar), "≤ 1.5x", verdict(tar, 1.5)))
tar_ro = ratios("W_TAR_RO", "W_TAR_NAT")
rows.append(("same, mounted `-o ro` (read-only superblock, no outbox/)", cell(tar_ro), "≤ 1.5x", verdict(tar_ro, 1.5)))
find = ratios("W_FIND_AL", "W_FIND_NAT")
rows.append(("warm `find rootfs -printf`, vs local disk", cell(find), "≤ 3x", verdict(find, 3.0)))
hfind = ratios("H_FIND_AL", "H_FIND_NAT")
rows.append(("hot `find rootfs -printf` (a second walk, nothing dropped), vs local disk", cell(hfind), "—", "—"))
htar = ratios("H_TAR_AL", "H_TAR_NAT")
rows.append(("hot `tar cf - rootfs` (a second pass, nothing dropped), vs local disk", cell(htar), "—", "—"))
tar_sq = ratios("W_TAR_AL", "W_TAR_SQ")
rows.append(("warm `tar cf -`, vs squashfuse", cell(tar_sq), "—", "—"))
find_sq = ratios("W_FIND_AL", "W_FIND_SQ")
rows.append(("warm `find`, vs squashfuse", cell(find_sq), "—", "—"))
tar_cfs = ratios("W_TAR_CFS", "W_TAR_NAT")
rows.append(("warm `tar cf -` on `mount-image` (composefs, kernel), vs local disk", cell(tar_cfs), "≤ 1.2x", verdict(tar_cfs, 1.2)))
find_cfs = ratios("W_FIND_CFS", "W_FIND_NAT")
rows.append(("warm `find -printf` on `mount-image` (composefs, kernel), vs local disk", cell(find_cfs), "≤ 1.2x", verdict(find_cfs, 1.2)))
export = ratios("X_AL", "X_BASE")
rows.append(("export of the tree (`apt-layer export`), vs umoci repack + skopeo copy", cell(export), "≤ 1.2x", verdict(export, 1.2)))
syn_n = os.environ.get("SYN_ENTRIES", "")
if syn_n:
    slope = float(os.environ["SYN_SLOPE"])
    small = int(os.environ["SMALL_ENTRIES"])
    rows.append((f"daemon RSS per entry beyond a fixed base: what a synthetic {int(syn_n)}-entry image adds after `find` (once stored), to a daemon that has served a {small}-entry one (bytes)", f"{slope:.0f}", "< 200", "met" if slope < 200 else "**missed**"))
    rows.append((f"same, beyond the RSS right after mount, both synthetic images, fixed costs included (bytes)", os.environ["SYN_RSS"], "—", "—"))
    rows.append((f"daemon peak RSS per entry, synthetic images (bytes)", os.environ["SYN_PEAK"], "—", "—"))
rss, anon = nums("RSS_PER"), nums("ANON_PER")
rss_cell = f"{med(rss):.0f}" + (f" (heap and stacks: {med(anon):.0f})" if anon else "") if rss else "n/a"
rows.append((f"daemon RSS per entry of the Debian image beyond the RSS right after mount, after the warm runs, fixed costs included (bytes)", rss_cell, "—", "—"))
peak = nums("PEAK_PER")
rows.append(("daemon peak RSS per entry beyond base, while streaming (bytes)", f"{med(peak):.0f}" if peak else "n/a", "—", "—"))

secs = [
    ("skopeo copy + umoci unpack + read + chroot", nums("C_BASE")),
    ("apt-layer cold read + chroot (gzip)", nums("C_AL")),
    ("apt-layer cold first read alone (gzip)", nums("F_AL")),
    ("apt-layer cold read + chroot (eStargz)", nums("C_ESZ")),
    ("apt-layer cold read + chroot (zstd:chunked)", nums("C_ZCH")),
    ("ratarmount download + index + read + chroot", nums("C_RAT")),
    ("100 Mbit/s: skopeo + umoci / apt-layer gzip / eStargz / zstd:chunked", nums("S_BASE") + [float("nan")] + nums("S_AL") + [float("nan")] + nums("S_ESZ") + [float("nan")] + nums("S_ZCH")),
    ("export: umoci repack + skopeo copy / apt-layer export", nums("X_BASE") + [float("nan")] + nums("X_AL")),
    ("tar cf - | cat (apt-layer / apt-layer -o ro / local / squashfuse / composefs)", nums("W_TAR_AL") + [float("nan")] + nums("W_TAR_RO") + [float("nan")] + nums("W_TAR_NAT") + [float("nan")] + nums("W_TAR_SQ") + [float("nan")] + nums("W_TAR_CFS")),
    ("find -printf (apt-layer / apt-layer -o ro / local / squashfuse / composefs)", nums("W_FIND_AL") + [float("nan")] + nums("W_FIND_RO") + [float("nan")] + nums("W_FIND_NAT") + [float("nan")] + nums("W_FIND_SQ") + [float("nan")] + nums("W_FIND_CFS")),
    ("hot find -printf / tar cf - | cat (apt-layer / local)", nums("H_FIND_AL") + [float("nan")] + nums("H_FIND_NAT") + [float("nan")] + nums("H_TAR_AL") + [float("nan")] + nums("H_TAR_NAT")),
]

out = []
out.append("# Benchmarks\n")
out.append("Regenerate with `sudo benches/e2e.sh` (this file and `benches/ratios.svg`); "
           "`benches/e2e.sh --smoke` runs in the test suite. Rounds alternate the contenders; "
           "the page cache is dropped before every timed step. Ratios are apt-layer / other: "
           "median (min–max) over rounds.\n")
out.append(f"- image: {os.environ['IMAGE_DESC']}, {int(os.environ['ENTRIES'])} entries, "
           f"{int(os.environ['UNCOMP'])/1e6:.0f} MB uncompressed, one tar+gzip layer of {layer/1e6:.1f} MB "
           f"(eStargz {float(os.environ.get('SIZE_estargz') or 0)/1e6:.1f} MB, "
           f"zstd:chunked {float(os.environ.get('SIZE_zstdchunked') or 0)/1e6:.1f} MB)")
out.append(f"- machine: {os.environ['CPU']}, {os.environ['MEM']}, kernel {os.environ['KERNEL']}, registry on loopback")
out.append(f"- rounds: {os.environ['ROUNDS']}\n")
out.append("| measurement | apt-layer ratio | target | |")
out.append("|---|---|---|---|")
for r in rows:
    out.append("| " + " | ".join(r) + " |")
out.append("\nRaw seconds per round:\n")
for name, xs in secs:
    out.append(f"- {name}: " + ", ".join("|" if x != x else f"{x:.3f}" for x in xs))
if os.environ.get("SLOW") != "1":
    out.append("\nThe throttled-link rows need `ip netns` and `tc` (iproute2) and were not measured.")
out.append("")
out.append(f"![ratios]({os.path.relpath(os.environ['SVG'], os.path.dirname(os.path.abspath(os.environ['OUT'])))})\n")
# Hand-written notes (why a target is missed, what would close it) survive
# regeneration: they live in benches/notes.md, appended to the real report.
notes = os.path.join(os.path.dirname(os.path.abspath(__file__)), "notes.md")
if os.environ.get("SMOKE") != "1" and os.path.exists(notes):
    out.append(open(notes).read())
open(os.environ["OUT"], "w").write("\n".join(out) + "\n")

# A small bar chart of the ratios (log-free, capped at 3x).
bars = [("cold gzip", cold, 0.12), ("cold eStargz", cold_esz, 0.12), ("cold zstd:chunked", cold_zch, 0.12),
        ("warm tar", tar, 1.5), ("warm find", find, 3.0), ("export", export, 1.2)]
w, bh, gap, left = 680, 28, 14, 150
h = 40 + len(bars) * (bh + gap)
scale = (w - left - 20) / 3.0
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="13">',
       f'<text x="10" y="20">apt-layer / alternative (median; dashed = target)</text>']
for i, (name, rs, target) in enumerate(bars):
    y = 34 + i * (bh + gap)
    v = min(st.median(rs), 3.0) if rs else 0
    color = "#2a7" if rs and st.median(rs) <= target else "#c33"
    svg.append(f'<text x="10" y="{y + bh * 0.7}">{name}</text>')
    svg.append(f'<rect x="{left}" y="{y}" width="{v * scale:.1f}" height="{bh}" fill="{color}"/>')
    svg.append(f'<line x1="{left + target * scale:.1f}" y1="{y - 3}" x2="{left + target * scale:.1f}" y2="{y + bh + 3}" stroke="#000" stroke-dasharray="4 3"/>')
    svg.append(f'<text x="{left + v * scale + 6:.1f}" y="{y + bh * 0.7}">{(st.median(rs) if rs else float("nan")):.3f}x</text>')
svg.append("</svg>")
open(os.environ["SVG"], "w").write("\n".join(svg) + "\n")
