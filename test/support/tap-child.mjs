/* global process, console, setInterval */
// Opens the tap in a process of its own, for test/tap.test.ts: the test SIGKILLs it to check what
// a killed agent leaves behind, or runs it without privileges. Plain node cannot import the
// TypeScript wrapper, so it imports the build of it (npm run build runs before the tests).
// argv: target as JSON, attachMode. Prints one JSON line: the opened tap, or the error.
import { Tap } from '../../dist/agent/tap.js';

try {
  const tap = Tap.open(
    JSON.parse(process.argv[2]),
    { onSegment: () => {} },
    { ringBufferBytes: 1 << 20, attachMode: process.argv[3] },
  );
  console.log(JSON.stringify({ attachMode: tap.attachMode, interfaces: tap.interfaces }));
  // Stays attached until killed.
  setInterval(() => {}, 1 << 30);
} catch (error) {
  console.log(JSON.stringify({ error: { code: error.code, message: error.message } }));
  process.exitCode = 1;
}
