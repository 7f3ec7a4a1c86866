/**
 * `npm run bench -- NAME`: runs one benchmark. Each prints its progress on stderr and ends with
 * one JSON line of figures on stdout, every figure measured against a baseline in the same run.
 */
const benches: Record<string, () => Promise<Record<string, unknown>>> = {
  tap: async () => (await import('./tap.js')).benchTap(),
  forward: async () => (await import('./forward.js')).benchForward(),
  mirror: async () => (await import('./mirror.js')).benchMirror(),
  files: async () => (await import('./files.js')).benchFiles(),
  outgoing: async () => (await import('./outgoing.js')).benchOutgoing(),
};

const name = process.argv[2] ?? '';
const bench = benches[name];
if (!bench) {
  console.error(`unknown benchmark "${name}": use one of ${Object.keys(benches).join(', ')}`);
  process.exit(2);
}
const figures = await bench();
console.log(JSON.stringify({ bench: name, ...figures }));
