/* global process, console */
// The app of `bench -- files`: reads the target's files as an app does (readFileSync), once
// to warm up and once measured, and prints one JSON line: the small files' latency p50 and
// p99 (ms) and the large file's throughput (MB/s). `node file-reader.mjs PREFIX COUNT`: PREFIX
// is put before each path (the target's root from this machine for the direct run, nothing
// under mirrord, where the layer reads the target's paths from the target).
import { readFileSync } from 'node:fs';

const [prefix = '', count = '0'] = process.argv.slice(2);

function small() {
  const ms = [];
  for (let i = 0; i < Number(count); i++) {
    const start = process.hrtime.bigint();
    readFileSync(`${prefix}/data/small/${i}`);
    ms.push(Number(process.hrtime.bigint() - start) / 1e6);
  }
  ms.sort((a, b) => a - b);
  const at = (q) => ms[Math.min(ms.length - 1, Math.ceil(q * ms.length) - 1)];
  return { p50: at(0.5), p99: at(0.99) };
}

small();
const latency = small();
const start = process.hrtime.bigint();
const large = readFileSync(`${prefix}/data/large`);
const seconds = Number(process.hrtime.bigint() - start) / 1e9;
console.log(JSON.stringify({ ...latency, mbps: large.length / 1e6 / seconds }));
