# Shell helpers the benchmark scripts source (`. benchmarks/lib.sh`).

wait_ready() {  # host:port seconds [pid]: waits for the model `reward` to be ready (gives up if pid exits)
  for _ in $(seq "$2"); do
    python3 -c "import urllib.request,sys; urllib.request.urlopen('http://$1/v2/models/reward/ready', timeout=2)" 2>/dev/null && return 0
    [ -n "${3:-}" ] && ! kill -0 "$3" 2>/dev/null && return 1
    sleep 1
  done
  return 1
}

stop() {  # pid: SIGTERM (the server drains), then wait for it to exit; SIGKILL after 60 s
  kill -TERM "$1" 2>/dev/null
  for _ in $(seq 60); do kill -0 "$1" 2>/dev/null || return 0; sleep 1; done
  kill -KILL "$1" 2>/dev/null
}
