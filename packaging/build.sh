#!/usr/bin/env bash
# Build the two release artifacts of llmd from this checkout:
#
#   dist/llmd                          one executable file (a shiv zipapp) holding llmd and every
#                                      dependency, wheels included; runs with the system python3
#   dist/llm-api_<version>_<arch>.deb  that file plus the systemd unit, sysusers/tmpfiles snippets,
#                                      /etc/llm-api/config.yaml, the nginx site and docs
#
# Usage: packaging/build.sh            (prints the two paths on its last two lines)
#   PYTHON=/usr/bin/python3.11   the interpreter the zipapp is built for and runs with (shebang);
#                                default /usr/bin/python3. Wheels are chosen for its version and
#                                platform, so the target host needs the same Python minor version
#                                (3.11 on Debian 12) and architecture; nothing else, no venv.
#   DEB_REVISION=1               Debian revision appended to the upstream version
#   DEB_MAINTAINER='Name <mail>' Maintainer: of the .deb
#   LINTIAN=auto|yes|no          run lintian on the .deb: auto = when installed (default)
#   SOURCE_DATE_EPOCH            timestamps inside both artifacts (default: the last commit's)
#
# Needs: python3 with venv (python3-venv), dpkg-deb, gzip; network access to PyPI on the first run.
# Build tools live in a throw-away venv, build/tools (never .venv), pinned below; delete build/ to
# start over. Runtime dependencies are resolved from pyproject.toml as binary wheels only, and
# their versions are recorded in /usr/share/doc/llm-api/bundled-python-packages.txt.
set -euo pipefail
# Files in both artifacts are world-readable whatever the caller's umask.
umask 022
cd "$(dirname "$0")/.."
top=$PWD

# Pinned build tools: bump deliberately (shiv's bootstrap code ends up inside dist/llmd).
TOOLS_PINS=(pip==25.3 setuptools==80.9.0 shiv==1.0.8 click==8.2.1)

PYTHON=${PYTHON:-/usr/bin/python3}
DEB_REVISION=${DEB_REVISION:-1}
DEB_MAINTAINER=${DEB_MAINTAINER:-LLM API maintainers <llm-api@llm.internal>}
LINTIAN=${LINTIAN:-auto}
build=$top/build
dist=$top/dist

log() { printf 'build.sh: %s\n' "$*" >&2; }
# A value made safe for the replacement side of sed's s/// (the maintainer's name may hold & or /).
sed_escape() { printf '%s' "$1" | sed -e 's/[\/&]/\\&/g'; }
die() { log "error: $*"; exit 1; }

for tool in dpkg-deb dpkg gzip "$PYTHON"; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found (apt-get install dpkg python3 python3-venv)"
done

# The shebang is the absolute path of the target interpreter, not `/usr/bin/env python3`: in a
# shell where pyenv or a venv comes first on PATH, env would pick an interpreter whose ABI may not
# match the bundled wheels.
pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
pynext=$("$PYTHON" -c 'import sys; print("%d.%d" % (sys.version_info[0], sys.version_info[1] + 1))')
version=$("$PYTHON" -c 'import re, sys; print(re.search(r"^__version__ = \"([^\"]+)\"", open(sys.argv[1]).read(), re.M)[1])' llmd/__init__.py)
pyproject_version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)
[ "$version" = "$pyproject_version" ] ||
  die "llmd.__version__ ($version) and pyproject.toml's version ($pyproject_version) differ"
arch=$(dpkg --print-architecture)
debversion=$version-$DEB_REVISION
# Reproducible timestamps (zip entries, files in the .deb, changelog date): the last commit's time
# unless the caller sets one, so two builds of one commit give identical artifacts.
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || date +%s)
fi
export SOURCE_DATE_EPOCH
log "llmd $version for Python $pyver ($PYTHON), $arch"

# ---- build tools --------------------------------------------------------------------------------
tools=$build/tools
stamp="$PYTHON ${TOOLS_PINS[*]}"
if [ ! -x "$tools/bin/python" ] || [ "$(cat "$tools/.pins" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "$tools"
  "$PYTHON" -m venv "$tools" || die "cannot create a venv with $PYTHON (apt-get install python3-venv)"
  "$tools/bin/python" -m pip install --quiet --disable-pip-version-check "${TOOLS_PINS[@]}"
  echo "$stamp" >"$tools/.pins"
fi
pip=("$tools/bin/python" -m pip --disable-pip-version-check)

# ---- llmd wheel, from a clean copy --------------------------------------------------------------
# Built from a copy of just the package sources so that setuptools' build/ and *.egg-info never
# land in the checkout, and stray files (caches, local configs) never land in the wheel.
src=$build/src
rm -rf "$src" "$build/wheel"
mkdir -p "$src" "$build/wheel"
cp pyproject.toml README.md "$src/"
cp -r llmd "$src/llmd"
find "$src" -name __pycache__ -prune -exec rm -rf {} +
# --no-build-isolation: use the pinned setuptools above instead of whatever is newest on PyPI.
"${pip[@]}" wheel --quiet --no-deps --no-build-isolation --wheel-dir "$build/wheel" "$src" \
  >"$build/wheel.log" 2>&1 || { cat "$build/wheel.log" >&2; die "building the llmd wheel failed"; }
wheel=$(ls "$build"/wheel/llmd-"$version"-*.whl)

# ---- site-packages: llmd and its dependencies, binary wheels only -------------------------------
# --only-binary: never compile an sdist here (that would need a compiler and tie the result to this
# host's libraries); manylinux wheels run on any glibc system as new as their tag.
# --no-compile: no .pyc in the zip (they hold build timestamps and bloat it); Python writes them
# into the unpacked copy on first import.
site=$build/site-packages
rm -rf "$site"
"${pip[@]}" install --quiet --target "$site" --only-binary :all: --no-compile "$wheel" \
  >"$build/pip.log" 2>&1 || { cat "$build/pip.log" >&2; die "installing the dependencies failed"; }
# pip --target also writes console scripts whose shebang is this build venv: useless and
# misleading inside the zipapp (shiv calls llmd.cli:main directly).
rm -rf "${site:?}/bin"

# ---- dist/llmd ------------------------------------------------------------------------------------
# shiv unpacks site-packages on first run to $SHIV_ROOT/llmd_<build id>/ (default ~/.shiv), because
# extension modules (uvloop, msgspec, aiohttp's C parts) cannot be imported from inside a zip. The
# default root stays ~/.shiv so that any user (root, an operator running `llmd check`) can run the
# file; the packaged service sets SHIV_ROOT=/var/lib/llm-api/.shiv (drop-in below), its only
# writable directory besides /run/llm-api. The build id is a hash of the contents, so a new build
# unpacks into a new directory and never reuses a stale one.
mkdir -p "$dist"
"$tools/bin/shiv" --reproducible --compressed --python "$PYTHON" \
  --entry-point llmd.cli:main --site-packages "$site" --output-file "$dist/llmd.tmp" \
  >"$build/shiv.log" 2>&1 || { cat "$build/shiv.log" >&2; die "shiv failed"; }
mv "$dist/llmd.tmp" "$dist/llmd"
chmod 0755 "$dist/llmd"
build_id=$("$PYTHON" -c 'import json, sys, zipfile; print(json.loads(zipfile.ZipFile(sys.argv[1]).read("environment.json"))["build_id"])' "$dist/llmd")

# Smoke test outside any venv, with the shebang's interpreter, and a scratch SHIV_ROOT.
smoke=$(mktemp -d)
trap 'rm -rf "$smoke"' EXIT
got=$(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$smoke" SHIV_ROOT="$smoke/shiv" "$dist/llmd" version) ||
  die "dist/llmd version failed"
[ "$got" = "llmd $version" ] || die "dist/llmd version printed '$got', expected 'llmd $version'"

# ---- the .deb -------------------------------------------------------------------------------------
pkg=$build/deb/llm-api
deb_src=$top/packaging/deb
rm -rf "$build/deb"
install -d "$pkg/DEBIAN"
install -D -m 0755 "$dist/llmd" "$pkg/usr/bin/llmd"
# /lib, not /usr/lib: where Debian 12's own packages install units (the usrmerge move comes later).
install -D -m 0644 systemd/llm-api.service "$pkg/lib/systemd/system/llm-api.service"
install -D -m 0644 "$deb_src/llm-api.service.d/shiv.conf" "$pkg/lib/systemd/system/llm-api.service.d/shiv.conf"
install -D -m 0644 systemd/llm-api.sysusers "$pkg/usr/lib/sysusers.d/llm-api.conf"
install -D -m 0644 systemd/llm-api.tmpfiles "$pkg/usr/lib/tmpfiles.d/llm-api.conf"
# Conffiles ship 0644 root:root (the llm-api group does not exist yet when dpkg unpacks them);
# postinst's systemd-tmpfiles run makes config.yaml 0640 root:llm-api.
install -D -m 0644 "$deb_src/config.yaml" "$pkg/etc/llm-api/config.yaml"
install -D -m 0644 nginx/llm-api.conf "$pkg/etc/nginx/sites-available/llm-api.conf"
doc=$pkg/usr/share/doc/llm-api
install -D -m 0644 README.md "$doc/README.md"
install -D -m 0644 "$deb_src/README.Debian" "$doc/README.Debian"
install -D -m 0644 systemd/gpu-host.conf "$doc/examples/gpu-host.conf"
install -D -m 0644 systemd/local-stores.conf "$doc/examples/local-stores.conf"
install -D -m 0644 "$deb_src/env.example" "$doc/examples/env"
if compgen -G "conf/*.yaml" >/dev/null; then
  install -m 0644 conf/*.yaml "$doc/examples/"
fi
install -D -m 0644 "$deb_src/lintian-overrides" "$pkg/usr/share/lintian/overrides/llm-api"
install -D -m 0644 "$deb_src/llmd.1" "$pkg/usr/share/man/man1/llmd.1"
gzip -9n "$pkg/usr/share/man/man1/llmd.1"

# changelog.Debian: one entry for this build, dated SOURCE_DATE_EPOCH.
changelog_date=$(date -u -R -d "@$SOURCE_DATE_EPOCH")
maintainer=$(sed_escape "$DEB_MAINTAINER")
sed -e "s/@DEBVERSION@/$debversion/g" -e "s/@VERSION@/$version/g" -e "s/@MAINTAINER@/$maintainer/g" \
  -e "s/@DATE@/$changelog_date/g" "$deb_src/changelog.in" >"$doc/changelog.Debian"
gzip -9n "$doc/changelog.Debian"

# copyright: llmd's license, then every Python distribution bundled in /usr/bin/llmd with its
# version, license and license text (the zip holds code under several licenses).
"$tools/bin/python" "$deb_src/bundled.py" "$site" --copyright "$deb_src/copyright.in" \
  --exclude llmd >"$doc/copyright"
"$tools/bin/python" "$deb_src/bundled.py" "$site" --list >"$doc/bundled-python-packages.txt"

# Wheels tagged manylinux_2_NN need glibc >= 2.NN; dpkg-shlibdeps cannot see inside the zip.
glibc=$("$tools/bin/python" "$deb_src/bundled.py" "$site" --min-glibc)

for script in postinst prerm postrm; do
  sed -e "s/@SHIV_BUILD@/llmd_$build_id/g" "$deb_src/$script" >"$pkg/DEBIAN/$script"
  chmod 0755 "$pkg/DEBIAN/$script"
done
install -m 0644 "$deb_src/conffiles" "$pkg/DEBIAN/conffiles"

installed_size=$(du -s -k --apparent-size --exclude=DEBIAN "$pkg" | cut -f1)
sed -e "s/@DEBVERSION@/$debversion/g" -e "s/@ARCH@/$arch/g" -e "s/@MAINTAINER@/$maintainer/g" \
  -e "s/@INSTALLED_SIZE@/$installed_size/g" -e "s/@PYVER@/$pyver/g" -e "s/@PYNEXT@/$pynext/g" \
  -e "s/@GLIBC@/$glibc/g" "$deb_src/control.in" >"$pkg/DEBIAN/control"
(cd "$pkg" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z |
  xargs -0 md5sum >DEBIAN/md5sums)
chmod 0644 "$pkg/DEBIAN/md5sums"

find "$pkg" -exec touch --no-dereference --date="@$SOURCE_DATE_EPOCH" {} +
deb=$dist/llm-api_${debversion}_$arch.deb
rm -f "$dist"/llm-api_*.deb
dpkg-deb --build --root-owner-group "$pkg" "$deb" >/dev/null

case $LINTIAN in
  no) ;;
  auto | yes)
    if command -v lintian >/dev/null 2>&1; then
      # Overrides shipped in the package are honoured; anything left at warning or above fails.
      lintian --fail-on error,warning --display-info "$deb" >&2 || die "lintian found problems (above)"
    elif [ "$LINTIAN" = yes ]; then
      die "lintian not found (apt-get install lintian)"
    else
      log "lintian not installed: skipped (apt-get install lintian)"
    fi
    ;;
  *) die "LINTIAN must be auto, yes or no, not '$LINTIAN'" ;;
esac

log "dist/llmd: $(du -h "$dist/llmd" | cut -f1), build id $build_id"
log "$(basename "$deb"): $(du -h "$deb" | cut -f1)"
echo "$dist/llmd"
echo "$deb"
