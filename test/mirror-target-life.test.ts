/**
 * The target's life under `mirrord mirror`, on local targets with the real CLI, agent and tap: a
 * target that goes away ends the session with a line naming what happened, exit code 1, and
 * nothing left (app, agent, links). The Kubernetes side (a deleted pod, a rolled-out
 * Deployment that the session follows) is in kube-mirror.test.ts.
 */
import { execFileSync, type ChildProcess } from 'node:child_process';
import {
  agentsOf,
  connectionsOn,
  killRun,
  mirrord,
  untilMirroring,
  untilWhileRunning,
  type MirrorRun,
} from './support/mirror-cli.js';
import { descendants, killAll, stillRunning } from './support/processes.js';
import { sinkServer } from './support/programs.js';
import { createSandbox, type Sandbox } from './support/sandbox.js';

const PORT = 7300;
const LOCAL_APP = `require('net').createServer((s) => s.resume().on('end', () => s.end())).listen(${PORT}, () => console.log('local app listening'))`;

/** The BPF links any process holds, by id (see agent.test.ts for why from fdinfo). */
function linksHeld(pids: number[]): number[] {
  return pids
    .flatMap((pid) => {
      try {
        return execFileSync('grep', ['-h', '^link_id:', '-r', `/proc/${pid}/fdinfo`], {
          encoding: 'utf8',
        })
          .split('\n')
          .filter(Boolean);
      } catch {
        return [];
      }
    })
    .map((line) => Number(line.split(/\s+/)[1]));
}

describe('the target’s life', () => {
  let sandbox: Sandbox;
  let target: ChildProcess;
  const runs: MirrorRun[] = [];
  const seen = new Map<number, string>();

  beforeEach(async () => {
    sandbox = createSandbox('gone');
    target = sandbox.spawn(sandbox.target, process.execPath, ['-e', sinkServer(PORT)]);
    await new Promise<void>((resolve) => target.stdout!.once('data', () => resolve()));
  });

  afterEach(async () => {
    for (const run of runs.splice(0)) await killRun(run);
    killAll(seen);
    seen.clear();
    sandbox.destroy();
  });

  /** Mirrors the sandbox's target into the local app, and waits until connections are replayed. */
  async function mirroring(targetArgs: string[]): Promise<MirrorRun> {
    const run = mirrord([...targetArgs, '--json', '--', process.execPath, '-e', LOCAL_APP]);
    runs.push(run);
    await untilMirroring(run, sandbox, PORT);
    for (const [pid, command] of descendants(run.child.pid!)) seen.set(pid, command);
    return run;
  }

  /** The session ended by itself: exit 1, the line, and nothing it started left. */
  async function expectEnded(run: MirrorRun, line: string): Promise<void> {
    const processes = new Map(seen);
    const agents = [...processes].filter(([, c]) => c.includes(' agent ')).map(([pid]) => pid);
    expect(agents).toHaveLength(1);
    const linksBefore = linksHeld(agents);
    expect(linksBefore.length).toBeGreaterThan(0);
    expect(await run.exited).toBe(1);
    expect(run.output().split('\n')).toContain(line);
    expect(await stillRunning(processes)).toEqual([]);
    expect(agentsOf(sandbox.target)).toEqual([]);
    // The links went with the agent: none of them is still in the kernel.
    const listed = execFileSync('bpftool', ['link', 'show'], { encoding: 'utf8' });
    for (const id of linksBefore) expect(listed).not.toMatch(new RegExp(`^${id}:`, 'm'));
  }

  test('--pid: the process killed and its netns deleted ends the session, saying so', async () => {
    const pid = target.pid!;
    const run = await mirroring(['--pid', String(pid)]);
    expect(connectionsOn(run, PORT).opened.length).toBeGreaterThan(0);

    target.kill('SIGKILL');
    execFileSync('ip', ['netns', 'del', sandbox.target]);
    await expectEnded(
      run,
      `mirrord: pid ${pid} went away (process ${pid} exited): the session ended`,
    );
  });

  test('--netns: the namespace deleted ends the session, though a process still holds it', async () => {
    const run = await mirroring(['--netns', sandbox.target]);
    execFileSync('ip', ['netns', 'del', sandbox.target]);
    await expectEnded(
      run,
      `mirrord: netns ${sandbox.target} went away (network namespace ${sandbox.target} was deleted): the session ended`,
    );
    expect(target.exitCode).toBeNull();
  });

  test('without a COMMAND (--port only), a target gone is a failure too: exit 1', async () => {
    const run = mirrord(['--pid', String(target.pid), '--port', `${PORT}:1`]);
    runs.push(run);
    await untilWhileRunning(run, () => run.output().includes('mirrord: mirroring'), 'mirroring');
    for (const [pid, command] of descendants(run.child.pid!)) seen.set(pid, command);
    target.kill('SIGKILL');
    await expectEnded(
      run,
      `mirrord: pid ${target.pid} went away (process ${target.pid} exited): the session ended`,
    );
  });
});
