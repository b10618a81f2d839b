# Progress of long shell steps (sourced), as llmd/progress.py shows it for Python steps.
#
# On a terminal (stderr is a TTY) one line is redrawn in place: step, measure, elapsed.
# Elsewhere (CI logs, the journal, a pipe) a step writes a line when it starts and one when it
# ends, and while it runs at most one line per LLMD_PROGRESS_EVERY_S seconds (default 30) when
# its measure moved, so a ten-minute build shows it is alive without flooding the log.
#
#   progress_run STEP LOG MEASURE -- COMMAND...     the command's output goes to LOG (appended)
#
# MEASURE is what the line counts: "percent" (the last "[ NN%]" line: cmake/make/ninja),
# "count:REGEX:UNIT" (lines of LOG matching REGEX, e.g. pip's "Collecting"), "size:FILE"
# (how big FILE has grown), or "" (elapsed only). LLMD_PROGRESS_TTY=1/0 forces either mode.

_progress_now() { local t=${EPOCHREALTIME/[.,]/}; echo $((t / 100000)); }  # tenths of a second
_progress_fmt() { printf '%d.%d s' $(($1 / 10)) $(($1 % 10)); }

progress_tty() {
  case ${LLMD_PROGRESS_TTY:-} in
    1) return 0 ;;
    0) return 1 ;;
    *) [ -t 2 ] ;;
  esac
}

_progress_measure() {  # LOG MEASURE
  local log=$1 measure=$2 n
  case $measure in
    percent)
      n=$(grep -o '^\[ *[0-9]\{1,3\}%\]' "$log" 2>/dev/null | tail -n 1 | tr -dc '0-9') || true
      [ -n "$n" ] && echo "$n%"
      ;;
    count:*)
      local rest=${measure#count:}
      n=$(grep -cE "${rest%:*}" "$log" 2>/dev/null) || true
      echo "${n:-0} ${rest##*:}"
      ;;
    size:*)
      n=$(stat -c %s "${measure#size:}" 2>/dev/null) || true
      [ -n "$n" ] && echo "$((n / 1048576)) MB"
      ;;
  esac
  return 0
}

progress_run() {
  local step=$1 log=$2 measure=$3
  shift 3
  [ "${1:-}" = "--" ] && shift
  local t0 now what shown="" last status=0
  t0=$(_progress_now)
  last=$t0
  progress_tty || echo "$step: started" >&2
  "$@" >>"$log" 2>&1 &
  local pid=$!
  # Look every 0.1 s whether it ended (a quick step takes no longer than it needs); measure and
  # draw every LLMD_PROGRESS_TICK_S (default 0.5 s; the measure greps the log).
  local tick measured=$t0
  tick=$(awk -v t="${LLMD_PROGRESS_TICK_S:-0.5}" 'BEGIN { printf "%d", t * 10 }')  # in tenths
  while kill -0 "$pid" 2>/dev/null; do
    sleep 0.1
    now=$(_progress_now)
    [ $((now - measured)) -ge "$tick" ] || continue
    measured=$now
    what=$(_progress_measure "$log" "$measure")
    if progress_tty; then
      printf '\r\033[2K%s  %s  %s' "$step" "${what:--}" "$(_progress_fmt $((now - t0)))" >&2
    elif [ -n "$what" ] && [ "$what" != "$shown" ] && [ $((now - last)) -ge $((${LLMD_PROGRESS_EVERY_S:-30} * 10)) ]; then
      echo "$step: $what, $(_progress_fmt $((now - t0)))" >&2
      shown=$what
      last=$now
    fi
  done
  wait "$pid" || status=$?
  now=$(_progress_now)
  what=$(_progress_measure "$log" "$measure")
  progress_tty && printf '\r\033[2K' >&2
  if [ "$status" -eq 0 ]; then
    echo "$step: done${what:+, $what} in $(_progress_fmt $((now - t0)))" >&2
  else
    echo "$step: failed (exit $status) after $(_progress_fmt $((now - t0))); log: $log" >&2
  fi
  return "$status"
}
