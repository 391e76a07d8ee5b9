-- wrk script: POST prepared bodies to one path, cycling through a file written by
-- bench/v2_overhead.py. Each line: the Inference-Header-Content-Length (0: a plain JSON body),
-- a space, then the body in hex (so binary bodies survive a line-based file).
-- Env: REFIT_BENCH_BODIES (the file), REFIT_BENCH_PATH (the path). Prints a JSON summary line.
local bodies, lengths = {}, {}
for line in io.lines(os.getenv("REFIT_BENCH_BODIES")) do
  local length, hex = line:match("^(%d+) (%x+)$")
  bodies[#bodies + 1] = hex:gsub("..", function(h) return string.char(tonumber(h, 16)) end)
  lengths[#lengths + 1] = tonumber(length)
end
local path = os.getenv("REFIT_BENCH_PATH")

local counter = 0
function setup(thread)
  thread:set("offset", counter * 997)
  counter = counter + 1
end

local i = 0
function request()
  i = i + 1
  local k = ((offset or 0) + i) % #bodies + 1
  local headers = {["Content-Type"] = "application/json"}
  if lengths[k] > 0 then
    headers = {["Content-Type"] = "application/octet-stream",
               ["Inference-Header-Content-Length"] = tostring(lengths[k])}
  end
  return wrk.format("POST", path, headers, bodies[k])
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
