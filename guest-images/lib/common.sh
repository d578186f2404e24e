# Shared helpers of the guest image builders (sourced, not run).
#
# Why a package cache and "name=version" pins: the images are built from Debian packages fetched with
# `apt-get download`, never installed on the build host. Resolving the exact versions first lets build.sh put
# them into the image stamp, so a new kernel in the archive rebuilds the image and nothing else does.

log() { printf '[guest-images] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# apt_ready: makes sure apt knows candidates (a fresh container has empty lists), running `apt-get update` once.
apt_ready() {
    if [ -z "$(apt-cache policy busybox-static 2>/dev/null | awk '/Candidate:/ && $2 != "(none)" {print $2}')" ]; then
        log "apt has no package lists: running apt-get update"
        apt-get update -qq >&2 || die "apt-get update failed"
    fi
}

# resolve_packages FILE: prints "name=version" for every package named in FILE.
# Lines: a package name, or "depends-of META" which names the linux-image-* package the metapackage META
# depends on (so the real kernel package, and its version, are pinned). '#' starts a comment.
# One `apt-cache policy` call for all names: the up-to-date check of build.sh should take well under a second.
resolve_packages() {
    local line name names=""
    apt_ready
    while read -r line; do
        line=${line%%#*}
        set -- $line
        [ $# -gt 0 ] || continue
        if [ "$1" = depends-of ]; then
            name=$(apt-cache depends "$2" | awk '/Depends: linux-image-/ {print $2; exit}')
            [ -n "$name" ] || die "cannot resolve the package $2 depends on"
        else
            name=$1
        fi
        names="$names $name"
    done <"$1"
    # shellcheck disable=SC2086
    apt-cache policy $names | awk -v want="$names" '
        /^[^ ]/ { pkg = $1; sub(/:$/, "", pkg) }
        $1 == "Candidate:" && $2 != "(none)" { cand[pkg] = $2 }
        END {
            n = split(want, w, " ")
            for (i = 1; i <= n; i++) {
                if (!(w[i] in cand)) { print "missing " w[i] > "/dev/stderr"; bad = 1; continue }
                print w[i] "=" cand[w[i]]
            }
            exit bad
        }' || die "some packages have no installable version (apt-get update?)"
}

# fetch_debs CACHE_DIR PIN...: downloads each name=version .deb into CACHE_DIR unless it is there already;
# prints the paths of the .deb files, one a line.
fetch_debs() {
    local cache=$1 pin file
    shift
    mkdir -p "$cache"
    for pin in "$@"; do
        # --print-uris needs no network: "'URI' FILE SIZE HASH"
        file=$(apt-get download --print-uris "$pin" 2>/dev/null | awk '{print $2; exit}')
        [ -n "$file" ] || die "apt cannot locate $pin"
        if [ ! -s "$cache/$file" ]; then
            log "downloading $pin"
            (cd "$cache" && apt-get download -q "$pin" >&2) || die "apt-get download $pin failed"
        fi
        printf '%s\n' "$cache/$file"
    done
}
