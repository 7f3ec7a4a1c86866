/**
 * The VS Code extension in a real VS Code (code-server), on the real test cluster: the quick
 * pick lists the namespace's pods and workloads (`mirrord ls`), F5 runs the workspace's Node app
 * under the debugger and a session with a pod, requests to the pod reach the debuggee (a
 * breakpoint in its handler is hit, its output is in the Debug Console), and stopping it leaves
 * no CLI, no agent process and no mirrord Job, Secret or pod.
 *
 * Errors reach the user: a target that is not running, a ServiceAccount denied `create jobs`, a
 * kubeconfig that is missing; each is a notification with the very line the CLI gives, F5
 * starts no debuggee, and nothing is left. Screenshots are in .test-out/screenshots/kube-editor-*.
 */
import { execFile } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { startEditor, type Editor } from './support/code-server.js';
import {
  HANDLER_LINE,
  VSIX,
  layerDirs,
  screenshotDir,
  nodeWorkspace,
  sessionProcesses,
  untilMirroringInEditor,
} from './support/editor-workspace.js';
import {
  agentProcesses,
  fixture,
  testCluster,
  type PodInfo,
  type TestCluster,
} from './support/kube.js';
import { identity, rulesWithout, type KubeconfigJson } from './support/kube-identity.js';
import { CLI, tempDir } from './support/mirror-cli.js';
import { runToEnd } from './support/processes.js';
import { waitFor } from './support/wait.js';

const run = promisify(execFile);
const NAMESPACE = 'kube-editor';
const PORT = 8080;
/** A loaded two-core machine starts containers and editors slowly: deadlines, not pauses. */
const SLOW = 300_000;

describe('the VS Code extension, on the real cluster', () => {
  let cluster: TestCluster;
  let dir: ReturnType<typeof tempDir>;
  let web: PodInfo;
  /** The admin kubeconfig with the test's namespace as its context's: what `ls` lists. */
  let kubeconfig: string;
  let workspace: string;
  let editor: Editor | undefined;

  beforeAll(async () => {
    cluster = await testCluster(NAMESPACE);
    dir = tempDir('kube-editor');
    const config = JSON.parse(readFileSync(cluster.kubeconfig, 'utf8')) as KubeconfigJson;
    for (const context of config.contexts) context.context.namespace = NAMESPACE;
    kubeconfig = join(dir.path, 'kubeconfig');
    writeFileSync(kubeconfig, JSON.stringify(config), { mode: 0o600 });
    web = await cluster.addPod('web', [
      {
        name: 'app',
        command: fixture('http-log-server.mjs', [String(PORT), '/tmp/web.log']),
        port: PORT,
      },
    ]);
    // No replica: listed, but with no pod to mirror.
    await cluster.addDeployment('stopped', [{ name: 'app', command: ['sleep', 'infinity'] }], 0);
    workspace = nodeWorkspace(dir.path, PORT);
  }, SLOW);

  afterEach(async () => {
    await editor?.close();
    editor = undefined;
  });

  afterAll(async () => {
    await cluster?.remove();
    dir?.remove();
  }, SLOW);

  async function openEditor(label: string): Promise<Editor> {
    editor = await startEditor({
      workspace,
      extensions: [VSIX],
      env: { KUBECONFIG: kubeconfig },
      screenshots: screenshotDir(`kube-editor-${label}`),
    });
    await editor.statusBarItem('mirrord').waitFor();
    return editor;
  }

  /** No session, agent or mirrord object of the namespace is left. */
  async function expectNothingLeft(): Promise<void> {
    await waitFor(
      'no mirrord session, agent, layer channel, Job, Secret or pod to be left',
      async () =>
        sessionProcesses().length === 0 &&
        agentProcesses().length === 0 &&
        layerDirs().length === 0 &&
        (await cluster.mirrordObjects()).length === 0,
      { ms: 90_000, everyMs: 500 },
    ).catch(async (error: Error) => {
      throw new Error(
        `${error.message}: sessions ${sessionProcesses().join(', ')}; agents ${agentProcesses().join(', ')}; objects ${(await cluster.mirrordObjects()).join(', ')}`,
      );
    });
  }

  test(
    'F5 with a pod: requests to the pod stop the debuggee at its breakpoint; stopping leaves nothing',
    async () => {
      const editor = await openEditor('pod');
      await editor.clickStatusBar('mirrord');
      await waitFor('the quick pick to list the namespace', async () => {
        const items = await editor.quickPickItems();
        return items.includes('pod/web') && items.includes('deployment/stopped');
      });
      await editor.screenshot('quick-pick');
      await editor.pickQuickItem('pod/web');

      await editor.setBreakpoint('server.js', HANDLER_LINE);
      await editor.startDebugging();
      // The agent Job starts first: a minute or more on a loaded machine.
      await editor.waitForDebugConsole(`listening on ${PORT}`, 240_000);
      const probe = () =>
        new Promise<void>((resolve, reject) => {
          const socket = net.connect(PORT, web.ip, () => {
            socket.destroy();
            resolve();
          });
          socket.on('error', reject);
        });
      await untilMirroringInEditor(editor, PORT, probe);
      await editor.screenshot('debugging');

      const request = run('curl', ['-sf', `http://${web.ip}:${PORT}/from-cluster`]);
      const stop = await editor.waitForDebugStopped(60_000);
      expect(stop.reason).toMatch(/breakpoint/i);
      expect(stop.frame).toContain('server.js');
      await editor.screenshot('breakpoint-hit');
      await editor.continueDebugging();
      await editor.waitForDebugConsole('handled GET /from-cluster from');
      await request;
      await editor.statusBarItem(/mirrord: .*web.* · \d+ conn/).waitFor();
      await editor.screenshot('debug-console');

      await editor.stopDebugging();
      await expectNothingLeft();
      await editor.screenshot('stopped');
    },
    SLOW,
  );

  test(
    'a target that is not running, a denied RBAC verb, a missing kubeconfig: each a notification with the CLI’s line',
    async () => {
      const editor = await openEditor('errors');
      const settings = join(workspace, 'mirrord.json');
      const denied = await identity(
        cluster,
        'no-create-jobs',
        rulesWithout('create', 'jobs'),
        dir.path,
      );
      const cases = [
        { name: 'not-running', target: 'deployment/stopped', settings: {} },
        { name: 'rbac', target: 'pod/web', settings: { kubeconfig: denied } },
        {
          name: 'no-kubeconfig',
          target: 'pod/web',
          settings: { kubeconfig: join(dir.path, 'missing') },
        },
      ];
      await editor.runCommand('mirrord: Toggle');
      for (const [index, each] of cases.entries()) {
        writeFileSync(settings, JSON.stringify(each.settings));
        // The CLI's own line for the same target and settings.
        const [kind, name] = each.target.split('/') as [string, string];
        const cli = await runToEnd(
          process.execPath,
          [CLI, 'session', `--${kind}`, name, '--config', settings],
          { ...process.env, KUBECONFIG: kubeconfig },
        );
        expect(cli.code).not.toBe(0);
        const { message } = JSON.parse(cli.stdout.trim().split('\n').at(-1)!) as {
          message: string;
        };

        // Toggling on asked for the first target; the others are selected by command.
        if (index > 0) await editor.runCommand('mirrord: Select Target');
        await editor.pickQuickItem(each.target, 60_000);
        await editor.startDebugging();
        await editor.waitForNotification(`mirrord: ${message}`, 180_000);
        await editor.screenshot(`notification-${each.name}`);
        await expectNothingLeft();
      }
      // No debuggee was started for any of them.
      expect(await editor.debugConsoleText()).not.toContain('listening on');
    },
    SLOW,
  );
});
