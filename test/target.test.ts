/**
 * Finding a target by container ID, with real processes in real cgroups named the way
 * containerd, CRI-O and Docker name them.
 */
import { randomBytes } from 'node:crypto';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { findContainerPid, parseContainerId } from '../src/agent/target.js';
import { netnsName } from '../src/platform/local/netns.js';
import { CGROUP_ROOT, removeCgroupTree } from './support/leftovers.js';
import { createSandbox, type Sandbox } from './support/sandbox.js';
import { MirrorSession } from './support/mirror-session.js';
import { waitForTcp } from '../src/platform/local/netns.js';
import { waitFor } from './support/wait.js';

const PORT = 7100;

/** A process of the sandbox's target netns, placed in a cgroup at `leaf` below a test root. */
function containerProcess(sandbox: Sandbox, root: string, leaf: string): number {
  const cgroup = join(root, leaf);
  mkdirSync(cgroup, { recursive: true });
  const child = sandbox.spawn(sandbox.target, 'sleep', ['120']);
  writeFileSync(join(cgroup, 'cgroup.procs'), String(child.pid));
  // `ip netns exec` execs sleep in place, so the pid is sleep's own.
  return child.pid!;
}

describe('target resolution by container id', () => {
  let sandbox: Sandbox;
  let root: string;

  beforeEach(() => {
    sandbox = createSandbox('target');
    root = join(CGROUP_ROOT, netnsName('mirrord-test', 'cgroup'));
  });

  afterEach(async () => {
    sandbox.destroy();
    // The processes were killed with the netns; cgroupfs lets the dirs go once they are empty.
    await waitFor(
      'the cgroups to be removed',
      () => {
        try {
          removeCgroupTree(root);
          return true;
        } catch (error) {
          // A test that made no cgroup has none to remove.
          return (error as NodeJS.ErrnoException).code === 'ENOENT';
        }
      },
      { ms: 5000, everyMs: 20 },
    );
  });

  test.each([
    [
      'containerd (systemd driver)',
      'containerd://',
      (id: string) => `kubepods.slice/cri-containerd-${id}.scope`,
    ],
    ['CRI-O', 'cri-o://', (id: string) => `kubepods.slice/crio-${id}.scope`],
    ['Docker (systemd driver)', 'docker://', (id: string) => `system.slice/docker-${id}.scope`],
    ['Docker (cgroupfs driver)', 'docker://', (id: string) => `docker/${id}`],
  ])('finds the process of a %s container', (_runtime, scheme, leaf) => {
    const id = randomBytes(32).toString('hex');
    const decoy = randomBytes(32).toString('hex');
    containerProcess(sandbox, root, leaf(decoy));
    const pid = containerProcess(sandbox, root, leaf(id));
    expect(findContainerPid(`${scheme}${id}`)).toBe(pid);
    // The short form `docker ps` prints works too.
    expect(findContainerPid(id.slice(0, 12))).toBe(pid);
  });

  test('rejects what is not a container id', () => {
    expect(() => parseContainerId('containerd://not-hex')).toThrow(/not a container id/);
    expect(() => parseContainerId('abc')).toThrow(/not a container id/);
    expect(parseContainerId('cri-o://ABCDEF0123456789')).toBe('abcdef0123456789');
  });

  test('the agent taps the netns of a container given by id', async () => {
    const id = randomBytes(32).toString('hex');
    containerProcess(sandbox, root, `kubepods.slice/cri-containerd-${id}.scope`);
    sandbox.spawn(sandbox.target, process.execPath, [
      '-e',
      `require('net').createServer((s) => s.once('data', () => s.end('HTTP/1.1 204 No Content\\r\\n\\r\\n'))).listen(${PORT})`,
    ]);
    await waitForTcp(sandbox.client, sandbox.targetAddress, PORT);
    const session = await MirrorSession.start({ containerId: `containerd://${id}` }, [PORT]);
    try {
      expect(session.agent.readiness.target).toBe(`container containerd://${id}`);
      await sandbox
        .runAsync(sandbox.client, 'curl', [
          '-s',
          '--max-time',
          '5',
          '--data',
          'hello from the container test',
          `http://${sandbox.targetAddress}:${PORT}/`,
        ])
        .catch(() => undefined);
      await session.until(() => session.closedConnections().length === 1, 'the request');
      const [connection] = session.connections.values();
      expect(connection?.head.toString()).toContain('hello from the container test');
    } finally {
      await session.stop();
    }
  });
});
