-- wrk script: POST /predict with one text per request, cycling through a file of JSON bodies
-- (one per line, written by bench/serve_load.py). Prints a JSON summary line at the end.
local bodies = {}
local path = os.getenv("REFIT_BENCH_BODIES")
for line in io.lines(path) do bodies[#bodies + 1] = line end

local counter = 0
function setup(thread)
  thread:set("offset", counter * 997)
  counter = counter + 1
end

local i = 0
function request()
  i = i + 1
  local body = bodies[((offset or 0) + i) % #bodies + 1]
  return wrk.format("POST", "/predict", {["Content-Type"] = "application/json"}, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "seconds": %.3f, "p50_ms": %.3f, "p95_ms": %.3f, "p99_ms": %.3f, ' ..
    '"max_ms": %.3f, "mean_ms": %.3f, "non_2xx": %d, "connect_errors": %d, "read_errors": %d, ' ..
    '"write_errors": %d, "timeouts": %d}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1000, latency:percentile(95) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000, latency.mean / 1000, e.status, e.connect, e.read,
    e.write, e.timeout))
end
