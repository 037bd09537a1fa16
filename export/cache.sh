# Sourced by models/demo.sh and tests/fixtures.sh: generated models and packages are cached under
# .cache/, keyed by a hash of the scripts (and pinned requirements) that made them, so a change to
# a builder rebuilds exactly what it made and nothing else.
py=.venv/bin/python
cache=.cache
hash_of() { cat "$@" | sha256sum | cut -c1-12; }
models_key=$(hash_of export/requirements.txt export/data-requirements.txt export/standins.py)
# Every Python file of the exporter, sub-packages included (export/int8/, export/ortrun/), in one
# fixed order so that the key does not depend on the file system's, the int8 calibration texts and
# the model families' recipes (models/*.toml).
export_key=$(hash_of export/requirements.txt export/calibration.txt $(find export -name '*.py' | LC_ALL=C sort) $(ls models/*.toml | LC_ALL=C sort))
models_dir=$cache/models-$models_key
packages_dir=$cache/packages-$export_key-$models_key

# build DIR COMMAND...: runs COMMAND, which writes DIR, unless DIR was completed before.
build() {
  local dir=$1; shift
  if [ -f "$dir.done" ]; then return 0; fi
  rm -rf "$dir"
  echo "building $dir" >&2
  "$@" >&2
  touch "$dir.done"
}

# standin NAME [ARGS...]: the stand-in model NAME (see export/standins.py) in $models_dir/NAME.
standin() {
  local name=$1; shift
  build "$models_dir/$name" $py -m export.standins "$@" --out "$models_dir/$name"
}

# package NAME VARIANTS [EXPORT OPTIONS...]: the exported package of $models_dir/NAME in
# $packages_dir/NAME. A cached package built with other variants or options is rebuilt (the
# options are kept in its .done marker).
package() {
  local name=$1 variants=$2; shift 2
  local dir=$packages_dir/$name
  if [ -f "$dir.done" ] && { [ "$(cat "$dir.done")" != "$*" ] || ! $py -c 'import json, sys; sys.exit(sorted(json.load(open(sys.argv[1]))["variants"]) != sorted(sys.argv[2].split(",")))' "$dir/embedder.json" "$variants" 2>/dev/null; }; then
    rm -f "$dir.done"
  fi
  build "$dir" $py -m export --model "$models_dir/$name" --out "$dir" --variants "$variants" "$@"
  printf '%s' "$*" > "$dir.done"
}
