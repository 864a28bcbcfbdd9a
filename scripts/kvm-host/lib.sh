# shellcheck shell=bash
# Shared helpers of scripts/kvm-host.sh and scripts/kvm-host/build-image.sh (bash).

kh_log() { [ -n "${KH_QUIET:-}" ] || printf 'kvm-host: %s\n' "$*" >&2; }
kh_err() { printf 'kvm-host: error: %s\n' "$*" >&2; }

# Single-quotes a string for sh (busybox ash reads what this writes).
kh_quote() {
    local s=${1//\'/\'\\\'\'}
    printf "'%s'" "$s"
}

# The shared libraries a dynamic ELF file needs, one resolved path a line; nothing for
# static binaries and scripts. Fails when a library cannot be found.
kh_ldd_libs() {
    local bin=$1 out
    out=$(LC_ALL=C ldd "$bin" 2>&1) || {
        # ldd says "not a dynamic executable" (and fails) for static binaries.
        case $out in *"not a dynamic executable"* | *"statically linked"*) return 0 ;; esac
        kh_err "ldd $bin failed: $out"
        return 1
    }
    if grep -q 'not found' <<<"$out"; then
        kh_err "$bin needs libraries that are missing here: $(grep 'not found' <<<"$out" | tr -s ' \t' ' ')"
        return 1
    fi
    # Lines: "libx.so.1 => /path (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)".
    awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$out"
}

# Copies FILE into the tree DEST at the same path, following symlinks for its content
# but keeping the name it was asked for. Directories on the way are canonicalised so
# that a merged-/usr layout (/lib -> usr/lib) in DEST is not clobbered.
kh_copy_file() {
    local dest=$1 file=$2 dir target
    dir=$(realpath -m "$(dirname "$file")")
    target="$dest$dir/$(basename "$file")"
    [ -e "$target" ] && return 0
    mkdir -p "$dest$dir"
    cp -L "$file" "$target"
}

# Copies each binary (when COPY_BIN is not "no") and the libraries it needs into DEST.
# With SKIP_LIST set to a file of paths, files listed there are left out (they are
# already in the host image). The interpreter of a "#!" script counts as a binary.
kh_copy_with_libs() {
    local dest=$1
    shift
    local bin lib libs interp
    for bin in "$@"; do
        [ -f "$bin" ] || {
            kh_err "cannot find $bin"
            return 1
        }
        if [ "$(head -c 2 "$bin" 2>/dev/null)" = '#!' ]; then
            read -r interp _ < <(head -n 1 "$bin" | cut -c3-)
            if [ "$(basename "$interp")" = env ]; then
                interp=$(head -n 1 "$bin" | cut -c3- | awk '{print $2}')
                interp=$(type -P "$interp") || interp=
            fi
            [ -n "$interp" ] && [ -f "$interp" ] && kh_copy_with_libs "$dest" "$interp"
            continue
        fi
        if [ "${COPY_BIN:-yes}" != no ] && ! kh_in_skip "$bin"; then
            kh_copy_file "$dest" "$bin" || return 1
        fi
        libs=$(kh_ldd_libs "$bin") || return 1
        for lib in $libs; do
            kh_in_skip "$lib" && continue
            kh_copy_file "$dest" "$lib" || return 1
        done
    done
}

kh_in_skip() {
    [ -n "${SKIP_LIST:-}" ] && [ -f "$SKIP_LIST" ] || return 1
    grep -qxF "$(realpath -m "$(dirname "$1")")/$(basename "$1")" "$SKIP_LIST"
}
