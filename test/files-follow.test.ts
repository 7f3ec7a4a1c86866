/**
 * The app's files after the session followed its target to a replacement (a workload's new pod
 * on a cluster, see test/kube-mirror.test.ts): file calls go to the replacement's agent, not to
 * the session of the agent that went away. Here the targets are two chrooted processes, each
 * with its own file, and the agents run in this process, placed by a placer that says its
 * agents are replaceable, as the Kubernetes one does for a deployment's pod.
 */
import type { ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { startAgent } from '../src/agent/server.js';
import type { PlacedAgent } from '../src/platform/placed-agent.js';
import { runMirror } from '../src/session/mirror.js';
import { startChrootedTarget } from './support/chrooted-target.js';
import { placedInProcess } from './support/in-process-agent.js';
import { tempDir, until } from './support/mirror-cli.js';

const SECRET = 'files-follow-test';

/** Prints what /which holds (or why it cannot be read) each time that changes. */
const APP = `
const fs = require('fs');
let last;
setInterval(() => {
  let now;
  try { now = fs.readFileSync('/which', 'utf8'); } catch (error) { now = error.code; }
  if (now !== last) console.log(now);
  last = now;
}, 100);
`;

describe('files after the session follows its target', () => {
  const dir = tempDir('files-follow');
  const targets: ChildProcess[] = [];

  afterAll(async () => {
    for (const target of targets) {
      if (target.exitCode !== null || target.signalCode !== null) continue;
      const exited = once(target, 'exit');
      target.kill('SIGKILL');
      await exited;
    }
    dir.remove();
  });

  /** A target whose /which holds its name. */
  async function startTarget(name: string): Promise<number> {
    const root = join(dir.path, name);
    mkdirSync(root, { recursive: true });
    writeFileSync(join(root, 'which'), name);
    const target = await startChrootedTarget(root, []);
    targets.push(target);
    return target.pid!;
  }

  async function placeAgent(pid: number): Promise<PlacedAgent> {
    const agent = await startAgent({
      target: { pid },
      host: '127.0.0.1',
      port: 0,
      idleTimeoutMs: 10_000,
      secret: SECRET,
    });
    return placedInProcess(agent, SECRET, true);
  }

  test("the app reads the replacement's files once the session followed it", async () => {
    const first = await startTarget('first');
    const lines: string[] = [];
    let output = '';
    let interrupt!: () => void;
    const interrupted = new Promise<void>((resolve) => (interrupt = resolve));
    const session = runMirror({
      placeAgent: async (_progress, replacing) =>
        placeAgent(replacing ? await startTarget('second') : first),
      command: [process.execPath, '-e', APP],
      ports: new Map(),
      ignorePorts: new Set(),
      midStream: false,
      files: { mode: 'read', local: [], remote: [] },
      log: (line) => lines.push(line),
      appOutput: {
        stdout: true,
        stderr: false,
        write: (_from, chunk) => (output += chunk.toString()),
      },
      interrupted,
    });
    const printed = (): string[] => output.split('\n');
    try {
      await until(() => printed().includes('first'), "the first target's file");
      targets[0]!.kill('SIGKILL');
      await until(() => printed().includes('second'), "the replacement's file");
    } finally {
      interrupt();
      expect(await session).toBe(130);
    }
    expect(lines).toContain(
      `mirrord: pid ${first} went away (process ${first} exited): waiting for its replacement`,
    );
  });
});
