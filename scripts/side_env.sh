# Sourced by vllm_env.sh and llm_env.sh: `side_env DIR` makes a fresh virtual environment DIR
# that sees the project's .venv (a .pth line), so code in it runs the same kvray as the suite.
side_env() {
  local dir=$1 site own
  [ -x .venv/bin/python ] || { echo "$dir: run the README's install first (.venv)" >&2; exit 2; }
  rm -rf "$dir"
  python3 -m venv "$dir"
  site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  own=$("$dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "import site; site.addsitedir('$site')" > "$own/zz_kvray_venv.pth"
}
