/* global process */
// jest's globalTeardown: the cluster a test of this run started goes with the run. Plain
// JavaScript that runs stop.sh: jest loads global hooks with Node's own resolution, which cannot
// follow the TypeScript sources' `.js` import specifiers.
import { execFileSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export default function teardown() {
  const script = join(dirname(fileURLToPath(import.meta.url)), 'stop.sh');
  execFileSync('bash', [script, '--if-owner', String(process.pid)], { stdio: 'inherit' });
}
