import type { ChildProcess } from 'node:child_process';
import type { Sandbox } from './sandbox.js';
import { waitFor } from './wait.js';

/**
 * A target service for `node -e`: reads each connection to its end, then answers with the
 * number of bytes it read; prints "listening" once it does.
 */
export function sinkServer(port: number): string {
  return `
require('net').createServer((s) => {
  let n = 0;
  s.on('data', (d) => { n += d.length; });
  s.on('end', () => s.end(String(n)));
  s.on('error', () => {});
}).listen(${port}, () => console.log('listening'));`;
}

/**
 * A client in the sandbox's client netns whose one connection to the target carries what the
 * test writes to its stdin, and ends when stdin ends: for connections the test paces itself.
 */
export function stdinClient(sandbox: Sandbox, port: number): ChildProcess {
  return sandbox.spawn(
    sandbox.client,
    process.execPath,
    [
      '-e',
      `const s = require('net').connect(${port}, process.argv[1]);
       s.on('error', () => {});
       process.stdin.on('data', (d) => s.write(d));
       process.stdin.on('end', () => s.end());`,
      sandbox.targetAddress,
    ],
    { stdio: ['pipe', 'pipe', 'pipe'] },
  );
}

/**
 * Runs a python3 client script in the client netns, as `script TARGET_ADDRESS PORT ...args`,
 * without blocking the event loop (the test's session must read while it runs); its stdout.
 */
export function pythonClient(
  sandbox: Sandbox,
  script: string,
  port: number,
  ...args: string[]
): Promise<string> {
  return sandbox.runAsync(sandbox.client, 'python3', [
    '-c',
    script,
    sandbox.targetAddress,
    String(port),
    ...args,
  ]);
}

/**
 * Resolves once the target's kernel acknowledged `bytes` bytes of the client netns's connection
 * to `port` (ss's bytes_acked, which counts the SYN as one): they reached the target, they are
 * not on their way. Throws after `ms`.
 */
export async function untilAcked(
  sandbox: Sandbox,
  port: number,
  bytes: number,
  ms = 10_000,
): Promise<void> {
  await waitFor(
    `${bytes} bytes to be acked`,
    async () => {
      const out = await sandbox.runAsync(sandbox.client, 'ss', [
        '-tniH',
        'state',
        'established',
        `( dport = :${port} )`,
      ]);
      return Number(/bytes_acked:(\d+)/.exec(out)?.[1] ?? 0) >= bytes + 1;
    },
    { ms, everyMs: 20 },
  );
}
