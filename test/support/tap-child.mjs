/* global process, console, setInterval */
// Opens the tap in a process of its own, for test/tap.test.ts: the test SIGKILLs it to check what
// a killed agent leaves behind, or runs it without privileges. It uses the addon directly
// because plain node cannot import the TypeScript wrapper.
// argv: target as JSON, attachMode. Prints one JSON line: the opened tap, or the error.
import { createRequire } from 'node:module';

const native = createRequire(import.meta.url)('../../build/Release/mirrord_tap.node');
try {
  const tap = native.open(JSON.parse(process.argv[2]), () => {}, 1 << 20, process.argv[3]);
  console.log(JSON.stringify({ attachMode: tap.attachMode, interfaces: tap.interfaces }));
  // Stays attached until killed.
  setInterval(() => {}, 1 << 30);
} catch (error) {
  console.log(JSON.stringify({ error: { code: error.code, message: error.message } }));
  process.exitCode = 1;
}
