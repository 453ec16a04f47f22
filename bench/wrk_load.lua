-- wrk's script for the API benchmarks (bench/harness.py: wrk_load). Arguments after `--`:
--   MODE PATH TOKEN EXPECT ARG
-- MODE get:   GET PATH .. one of the ids in the file ARG (one a line), at random
-- MODE post:  POST PATH {"task_id": "<ARG>-<thread>-<n>"}: an id never sent before
-- MODE batch: POST PATH {"tasks": [{"task_id": ...}, ...]}, BATCH (the 6th argument) new ids a call
-- TOKEN: the bearer token, or "-" for none. A response whose status is not EXPECT is counted, and the
-- first one's status and body kept: done() prints them beside the latency percentiles, one
-- `wrk_load key=value ...` line and one `wrk_load_sample ...` line, which wrk_load parses.

local threads = {}
local thread_count = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("thread_no", thread_count)
  table.insert(threads, thread)
end

function init(args)
  mode, path, expect, given = args[1], args[2], tonumber(args[4]), args[5]
  batch = tonumber(args[6] or "1")
  headers = { ["Content-Type"] = "application/json" }
  if args[3] ~= "-" then
    headers["Authorization"] = "Bearer " .. args[3]
  end
  sent, unexpected, sample = 0, 0, ""
  math.randomseed(os.time() * 1000 + thread_no)
  if mode == "get" then
    ids = {}
    for line in io.lines(given) do
      ids[#ids + 1] = line
    end
    if #ids == 0 then
      error("no ids in " .. given)
    end
  elseif mode ~= "post" and mode ~= "batch" then
    error("unknown mode " .. tostring(mode))
  end
end

local function new_id()
  sent = sent + 1
  return given .. "-" .. thread_no .. "-" .. sent
end

function request()
  if mode == "get" then
    return wrk.format("GET", path .. ids[math.random(#ids)], headers)
  elseif mode == "post" then
    return wrk.format("POST", path, headers, '{"task_id":"' .. new_id() .. '"}')
  end
  local items = {}
  for i = 1, batch do
    items[i] = '{"task_id":"' .. new_id() .. '"}'
  end
  return wrk.format("POST", path, headers, '{"tasks":[' .. table.concat(items, ",") .. "]}")
end

function response(status, _headers, body)
  if status ~= expect then
    unexpected = unexpected + 1
    if sample == "" then
      sample = status .. " " .. string.sub(body or "", 1, 300):gsub("%s+", " ")
    end
  end
end

function done(summary, latency, _requests)
  local bad, first = 0, ""
  for _, thread in ipairs(threads) do
    bad = bad + thread:get("unexpected")
    if first == "" then
      first = thread:get("sample")
    end
  end
  local errors = summary.errors
  io.write(string.format(
    "wrk_load requests=%d duration_us=%d unexpected=%d socket_errors=%d timeouts=%d "
      .. "p50_us=%d p90_us=%d p99_us=%d max_us=%d\n",
    summary.requests, summary.duration, bad,
    errors.connect + errors.read + errors.write, errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max
  ))
  io.write("wrk_load_sample " .. first .. "\n")
end
