/**
 * The VS Code extension in a real VS Code (code-server 4.100.3, driven through Chromium), with a
 * local target: a sandbox network namespace with a real server in it. As a user does: the status
 * bar turns mirrord on, the quick pick offers the namespace (and tells, in a notification with
 * the CLI's own line, that Kubernetes targets cannot be listed without a kubeconfig), F5 starts
 * the workspace's Node app under the built-in JavaScript debugger and a mirrord session,
 * requests to the target reach the debuggee (a breakpoint in its handler is hit, its output is
 * in the Debug Console, with the original client's address), and stopping the debuggee ends the
 * session: no CLI, agent or layer channel is left. F5 again runs with the remembered target, and
 * closing the window while it runs leaves nothing either. Screenshots of each step are in
 * .test-out/screenshots/editor-netns/.
 */
import { join } from 'node:path';
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
import { CLI, FIXTURES, agentsOf, tempDir } from './support/mirror-cli.js';
import { runToEnd } from './support/processes.js';
import { createSandbox, type Sandbox } from './support/sandbox.js';
import { waitFor } from './support/wait.js';

const PORT = 8080;
/** Starting the editor, the debugger and a session: generous, as deadlines. */
const SLOW = 300_000;

describe('the VS Code extension, with a local target', () => {
  let sandbox: Sandbox;
  let dir: ReturnType<typeof tempDir>;
  let editor: Editor | undefined;

  beforeAll(() => {
    sandbox = createSandbox('editor');
    dir = tempDir('editor');
    sandbox.spawn(sandbox.target, process.execPath, [
      join(FIXTURES, 'http-log-server.mjs'),
      String(PORT),
      join(dir.path, 'target.log'),
    ]);
  });

  /** Waits until no session CLI, agent or live layer channel of the target is left. */
  const untilNothingLeft = () =>
    waitFor(
      'the session, its agent and its layer channel to be gone',
      () =>
        sessionProcesses().length === 0 &&
        agentsOf(sandbox.target).length === 0 &&
        layerDirs().length === 0,
      { ms: 60_000, everyMs: 200 },
    );

  afterAll(async () => {
    await editor?.close();
    sandbox.destroy();
    dir.remove();
  }, SLOW);

  test(
    'status bar, quick pick, F5: the debuggee gets the target’s requests; stopping it leaves nothing',
    async () => {
      const missingKubeconfig = join(dir.path, 'no-such-kubeconfig');
      editor = await startEditor({
        workspace: nodeWorkspace(dir.path, PORT),
        extensions: [VSIX],
        env: { KUBECONFIG: missingKubeconfig },
        screenshots: screenshotDir('editor-netns'),
      });
      await editor.screenshot('workbench');
      await editor.statusBarItem('mirrord').waitFor();

      // Turned on for the first time, it asks for the target.
      await editor.clickStatusBar('mirrord');
      const target = `netns/${sandbox.target}`;
      await waitFor(`the quick pick to offer ${target}`, async () =>
        (await editor!.quickPickItems()).includes(target),
      );
      // The CLI's own line for the missing kubeconfig, as `mirrord ls --json` gives it.
      const ls = await runToEnd(process.execPath, [CLI, 'ls', '--json'], {
        ...process.env,
        KUBECONFIG: missingKubeconfig,
      });
      const { error } = JSON.parse(ls.stdout) as { error: string };
      expect(error).toContain(missingKubeconfig);
      await editor.waitForNotification(`mirrord: cannot list Kubernetes targets: ${error}`);
      await editor.screenshot('quick-pick');
      await editor.pickQuickItem(target);
      await editor.screenshot('mirrord-on');

      await editor.setBreakpoint('server.js', HANDLER_LINE);
      await editor.startDebugging();
      await editor.waitForDebugConsole(`listening on ${PORT}`, 120_000);
      const probe = () =>
        sandbox.runAsync(sandbox.client, 'bash', [
          '-c',
          `exec 3<>/dev/tcp/${sandbox.targetAddress}/${PORT}`,
        ]);
      await untilMirroringInEditor(editor, PORT, probe);
      await editor.screenshot('debugging');

      // A request to the target: the target answers it; its copy stops the debuggee in the handler.
      const request = sandbox.runAsync(sandbox.client, 'curl', [
        '-sf',
        `http://${sandbox.targetAddress}:${PORT}/from-staging`,
      ]);
      const stop = await editor.waitForDebugStopped(60_000);
      expect(stop.reason).toMatch(/breakpoint/i);
      expect(stop.frame).toContain('server.js');
      await editor.screenshot('breakpoint-hit');
      await editor.continueDebugging();
      await editor.waitForDebugConsole(
        new RegExp(
          `handled GET /from-staging from (::ffff:)?${sandbox.clientAddress.replace(/\./g, '\\.')}`,
        ),
      );
      await request;
      await editor.screenshot('debug-console');
      // The status bar shows the session's counters.
      await editor.statusBarItem(/mirrord: netns .* · \d+ conn/).waitFor();
      await editor.screenshot('counters');

      await editor.stopDebugging();
      await untilNothingLeft();
      await editor.statusBarItem(/^\s*mirrord\s*$/).waitFor();
      await editor.screenshot('stopped');

      // F5 again, with the target remembered: no quick pick. Then the window closes while the
      // debuggee runs: the session ends with it.
      await editor.startDebugging();
      await waitFor(
        'a second session and its agent',
        () => sessionProcesses().length === 1 && agentsOf(sandbox.target).length === 1,
        { ms: 120_000, everyMs: 200 },
      );
      await editor.statusBarItem(/mirrord: netns .* · \d+ conn/).waitFor({ timeout: 60_000 });
      await editor.screenshot('debugging-again');
      await editor.close();
      editor = undefined;
      await untilNothingLeft();
    },
    SLOW,
  );
});
