#!/usr/bin/env bash
# Run here, before a GPU session's one device call: gathers into .carry/ (ignored by git, carried by
# the call) what bench/gpu_engine.py needs on the lent GPU machine and does not find there. That
# machine has Python 3.12 with torch, transformers, accelerate, huggingface_hub, pillow, numpy,
# requests and prometheus-client (/work/.library/device/KINDS.md), no network, and no Redis or Celery.
#   - .carry/whl: the API's and worker's own packages as Python 3.12 wheels (about 11 MB), less those
#     the image has, which must not be shadowed (numpy, pillow, jinja2 beside torch);
#   - .carry/bin/redis-server: this machine's redis-server, with the libraries it links that an
#     Ubuntu image may lack, behind a wrapper that points the loader at them.
# Then: bench/device/run.sh, as the device call's command (docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
carry=.carry
grep -qx "/$carry/" .git/info/exclude 2>/dev/null || echo "/$carry/" >> .git/info/exclude
rm -rf "$carry" && mkdir -p "$carry/whl" "$carry/bin" "$carry/lib"

# What the image has (KINDS.md, read 2026-11-17). click and werkzeug are carried all the same: Celery
# and Flask want recent ones, and nothing of the image's needs an older one.
present="jinja2 markupsafe packaging python-dateutil six typing-extensions pillow numpy requests urllib3 idna
certifi charset-normalizer prometheus-client"
platforms=()
for tag in manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d "$carry/whl.all" 'flask>=3.0' 'gunicorn>=22' 'gevent>=24.2' 'redis>=5' 'celery[redis]>=5.4' 'pypdfium2>=4.30' \
  2> >(grep -v '^WARNING: Location' >&2)
for wheel in "$carry"/whl.all/*.whl; do
  name=$(basename "$wheel" | cut -d- -f1 | tr '[:upper:]_' '[:lower:]-')
  case " $(echo $present) " in
    *" $name "*) ;;
    *) mv "$wheel" "$carry/whl/" ;;
  esac
done
rm -rf "$carry/whl.all"

binary=$(command -v redis-server) || { echo "prepare.sh: redis-server is not installed here (apt-get install redis-server)" >&2; exit 2; }
cp "$binary" "$carry/bin/redis-server.real"
# Every library it links but the C runtime, which the image's own (newer) glibc provides.
ldd "$binary" | awk '/=> \//{print $3}' | grep -Ev '/(libc|libm|libstdc\+\+|libgcc_s|ld-linux[^/]*)\.so' |
  xargs -I{} cp -L {} "$carry/lib/"
cat > "$carry/bin/redis-server" <<'WRAP'
#!/bin/sh
here=$(dirname "$(readlink -f "$0")")
LD_LIBRARY_PATH="$here/../lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/redis-server.real" "$@"
WRAP
chmod +x "$carry/bin/redis-server" "$carry/bin/redis-server.real"
"$carry/bin/redis-server" --version >/dev/null
echo "prepare.sh: $(ls "$carry/whl" | wc -l) wheels and redis-server in $carry ($(du -sh "$carry" | cut -f1)); carry [\"$carry\"]"
