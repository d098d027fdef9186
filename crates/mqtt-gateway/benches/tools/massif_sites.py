"""Summarise a massif.out snapshot: bytes by allocation site (the first frames outside the
allocator). Usage: python3 massif_sites.py massif.out [peak|SNAPSHOT] [TOP] [FRAMES]"""
import re, sys, collections
path, which = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "peak"
lines = open(path).read().split("\n")
snaps = []; cur = None
i = 0
while i < len(lines):
    l = lines[i]
    if l.startswith("snapshot="):
        cur = {"n": int(l.split("=")[1])}; snaps.append(cur)
    elif l.startswith("mem_heap_B="): cur["heap"] = int(l.split("=")[1])
    elif l.startswith("heap_tree="):
        cur["kind"] = l.split("=")[1]
        if cur["kind"] in ("detailed", "peak"):
            tree_lines = []
            i += 1
            while i < len(lines) and lines[i] and not lines[i].startswith("#"):
                tree_lines.append(lines[i]); i += 1
            cur["tree"] = tree_lines
            continue
    i += 1
if which == "peak":
    snap = [s for s in snaps if s.get("kind") == "peak"][0]
else:
    snap = [s for s in snaps if s["n"] == int(which)][0]
print("snapshot", snap["n"], "heap", snap["heap"])
skip_loc = re.compile(r"\((library/|unix\.rs|alloc\.rs|raw_vec|mod\.rs:560|raw\.rs)")
skip = re.compile(r"^(UnknownInlinedFun \(library|alloc::|core::|std::|hashbrown::|__rust|<alloc::|<core::|<std::|bytes::bytes_mut|<bytes::bytes_mut|malloc|realloc|calloc|0x[0-9A-F]+: \?\?\?)")
sites = collections.Counter()
stack = []
for l in snap["tree"]:
    m = re.match(r"^( *)n(\d+): (\d+) (.*)$", l)
    depth, nchild, b, text = len(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4)
    fn = re.sub(r"^0x[0-9A-F]+: ", "", text)
    fn = re.sub(r" \(in /.*\)$", "", fn)
    stack = stack[:depth] + [(fn, b)]
    if nchild == 0:
        frames = [f for f, _ in stack[1:]]
        keep = [f for f in frames if not skip.match(f) and not skip_loc.search(f)]
        key = " <- ".join(re.sub(r"^UnknownInlinedFun ", "~", k)[:90] for k in keep[:int(sys.argv[4]) if len(sys.argv) > 4 else 4])
        sites[key] += b
total = snap["heap"]
for k, b in sites.most_common(int(sys.argv[3]) if len(sys.argv) > 3 else 30):
    print(f"{b/1e6:8.2f} MB {100*b/total:5.1f}%  {k}")
