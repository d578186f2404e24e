# Flattens the small YAML subset of cloud-init seeds into a directory tree: a map is a directory, a list a
# directory of 000, 001, ... entries, a scalar a file holding its value.  Understood: block maps and lists
# (lists indented or not), `- key: value` list items, `- - a` lists in lists, plain / 'single' / "double"
# quoted scalars, literal blocks (|, |-, |+; > is read like |), flow lists of scalars ([a, "b c"]), comments
# on their own line or after a value.
# Not understood: anchors, tags, flow maps, multi-line plain scalars.
# usage: awk -v out=DIR -f yaml2tree.awk FILE
function unquote(s,    r) {
  if (s ~ /^['"]/) { r = s; sub(/[ \t]+#[^'"]*$/, "", r); if (r ~ /^'.*'$/ || r ~ /^".*"$/) s = r }
  if (s ~ /^'.*'$/) { s = substr(s, 2, length(s) - 2); gsub(/''/, "'", s); return s }
  if (s ~ /^".*"$/) {
    s = substr(s, 2, length(s) - 2)
    gsub(/\\\\/, "\001", s); gsub(/\\"/, "\"", s); gsub(/\\n/, "\n", s); gsub(/\\t/, "\t", s)
    gsub(/\001/, "\\", s); return s
  }
  sub(/[ \t]+#.*$/, "", s)
  return s
}
function emit(path, value,    dir) {
  dir = path; sub(/\/[^\/]*$/, "", dir)
  system("mkdir -p '" dir "'")
  printf "%s", value > path
  close(path)
}
function mkdirp(path) { system("mkdir -p '" path "'") }
function safe(k) { gsub(/[\/]/, "_", k); gsub(/'/, "", k); return k }
function idx(n) { return sprintf("%03d", n) }
function flow(path, s,    n, i, c, item, q, out) {
  s = substr(s, 2, length(s) - 2); n = 0; item = ""; q = ""
  mkdirp(path)
  for (i = 1; i <= length(s); i++) {
    c = substr(s, i, 1)
    if (q != "") { item = item c; if (c == q) q = ""; continue }
    if (c == "'" || c == "\"") { q = c; item = item c; continue }
    if (c == ",") { gsub(/^[ \t]+|[ \t]+$/, "", item); emit(path "/" idx(n++), unquote(item)); item = ""; continue }
    item = item c
  }
  gsub(/^[ \t]+|[ \t]+$/, "", item)
  if (item != "") emit(path "/" idx(n++), unquote(item))
}
function scalar(path, v) {
  if (v ~ /^\[.*\]$/) flow(path, v); else emit(path, unquote(v))
}
function end_block(    v) {
  v = block_text
  if (block_chomp == "-") sub(/\n+$/, "", v)
  else if (block_chomp != "+") { sub(/\n+$/, "", v); if (v != "") v = v "\n" }
  emit(block_path, v)
  in_block = 0
}
function start_block(path, parent_ind, v) {
  in_block = 1; block_path = path; block_parent = parent_ind; block_ind = -1; block_text = ""
  block_chomp = substr(v, 2, 1)
}
# key: value at a map whose path is p (line indentation i)
function keyval(p, i, t,    k, v) {
  k = t; sub(/:([ \t].*)?$/, "", k); k = safe(unquote(k))
  v = t; if (index(v, ":") > 0) { v = substr(v, index(v, ":") + 1) } else { v = "" }
  gsub(/^[ \t]+|[ \t]+$/, "", v)
  if (v == "") { pending = p "/" k; pend_ind = i; return }
  if (v ~ /^[|>][-+]?$/) { start_block(p "/" k, i, v); return }
  scalar(p "/" k, v)
}
BEGIN { sp = 0; st_ind[0] = -1; st_path[0] = out; st_kind[0] = "map"; pending = ""; in_block = 0; mkdirp(out) }
{
  line = $0; sub(/\r$/, "", line)
  if (in_block) {
    if (line ~ /^[ \t]*$/) { if (block_ind >= 0) block_text = block_text "\n"; next }
    match(line, /^ */); ind = RLENGTH
    if (block_ind < 0) { if (ind > block_parent) block_ind = ind; else end_block() }
    if (in_block) {
      if (ind >= block_ind) { block_text = block_text substr(line, block_ind + 1) "\n"; next }
      end_block()
    }
  }
  if (line ~ /^[ \t]*(#.*)?$/ || line ~ /^---/ || line ~ /^\.\.\./) next
  match(line, /^ */); ind = RLENGTH; t = substr(line, ind + 1)
  if (pending != "") {
    if (t ~ /^-( |$)/ && ind >= pend_ind) { sp++; st_ind[sp] = ind; st_path[sp] = pending; st_kind[sp] = "seq"; st_n[sp] = 0; mkdirp(pending) }
    else if (ind > pend_ind) { sp++; st_ind[sp] = ind; st_path[sp] = pending; st_kind[sp] = "map"; mkdirp(pending) }
    else emit(pending, "")
    pending = ""
  }
  while (sp > 0 && (st_ind[sp] > ind || (st_ind[sp] == ind && st_kind[sp] == "seq" && t !~ /^-( |$)/))) sp--
  if (st_kind[sp] == "seq" && t ~ /^-( |$)/) {
    item = st_path[sp] "/" idx(st_n[sp]++)
    rest = substr(t, 2); sub(/^ +/, "", rest)
    # "- - a": a list inside a list item (PyYAML writes runcmd's argv lists so); its dash column is its indent
    while (rest ~ /^-( |$)/) {
      sp++; st_ind[sp] = ind + length(t) - length(rest); st_path[sp] = item; st_kind[sp] = "seq"; st_n[sp] = 0
      mkdirp(item); item = item "/" idx(st_n[sp]++)
      t = rest; ind = st_ind[sp]; rest = substr(t, 2); sub(/^ +/, "", rest)
    }
    if (rest == "") { pending = item; pend_ind = ind + 1; next }
    if (rest ~ /^[|>][-+]?$/) { start_block(item, ind, rest); next }
    if (rest ~ /^[^'"\[][^:]*:( |$)/ || rest ~ /^['"][^'"]*['"]:( |$)/) {
      sp++; st_ind[sp] = ind + 1 + (length(t) - 1 - length(rest)); st_path[sp] = item; st_kind[sp] = "map"; mkdirp(item)
      keyval(item, st_ind[sp], rest); next
    }
    scalar(item, rest); next
  }
  keyval(st_path[sp], ind, t)
}
END { if (in_block) end_block(); if (pending != "") emit(pending, "") }
