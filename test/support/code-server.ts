/**
 * A real VS Code for tests: code-server (VS Code 1.100.3 served to a browser, installed by
 * test/editor/install.sh) driven through Debian's Chromium with playwright-core the way a user
 * drives it: the command palette, the status bar, quick picks, notifications, breakpoints and the
 * built-in JavaScript debugger. Each editor's state (settings, extensions, logs, the browser's
 * profile, code-server's XDG directories and temporary files) lives in a fresh directory that
 * close() removes; nothing is written to $HOME.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { homedir, tmpdir } from 'node:os';
import { basename, dirname, join, resolve } from 'node:path';
import { chromium, type BrowserContext, type Locator, type Page } from 'playwright-core';
import { EDITOR_MARK, EDITOR_PREFIX, editorProcesses } from './leftovers.js';
import { commandLine } from './processes.js';
import { WaitTimeout, waitFor } from './wait.js';

export const CODE_SERVER_VERSION = '4.100.3';

/** Where test/editor/install.sh installs code-server (the same path, computed the same way). */
export function codeServerDir(): string {
  const cache =
    process.env.MIRRORD_DEV_CACHE ??
    join(process.env.XDG_CACHE_HOME ?? join(homedir(), '.cache'), 'mirrord-dev');
  return join(cache, `code-server-${CODE_SERVER_VERSION}`);
}

export interface EditorOptions {
  /** The folder to open. */
  workspace: string;
  /** .vsix files installed before the editor starts. */
  extensions: string[];
  /**
   * User settings, over those that keep the editor quiet (QUIET_SETTINGS) and under those the
   * methods rely on (DRIVEN_SETTINGS: workspace trust off, the debugger's views).
   */
  settings?: Record<string, unknown>;
  /**
   * More environment for code-server, which its extension host, terminals and debugged
   * programs inherit (PATH, KUBECONFIG, ...). The editor's own XDG directories and TMPDIR win.
   */
  env?: NodeJS.ProcessEnv;
  /** Where screenshot() writes, created if missing. */
  screenshots: string;
}

/** Where the debugger stopped, as the Call Stack view shows it. */
export interface DebugStop {
  /** The paused session's state, such as "Paused on breakpoint". */
  reason: string;
  /** The top stack frame, such as "global.main, line 3, server.js". */
  frame: string;
}

/** Text to look for: a string anywhere in the text, a RegExp as it matches. */
export type TextMatch = string | RegExp;

/**
 * A started editor. Each method waits for what it needs with a deadline (its last parameter, in
 * ms) and fails with a message that says what it waited for, the path of a screenshot taken
 * then, and code-server's last output.
 */
export interface Editor {
  /** The workbench's page, for what the methods do not cover. */
  readonly page: Page;
  /** VS Code's user data directory (User/settings.json, logs/). */
  readonly userDataDir: string;
  /** Writes `<screenshots>/<NN>-<step>.png`, numbered in the order taken; returns its path. */
  screenshot(step: string): Promise<string>;
  /** Runs a command from the command palette (F1) by its label there, "Category: Title". */
  runCommand(title: string, timeoutMs?: number): Promise<void>;
  /** The status bar entry whose text or accessible label contains `text` (or matches it). */
  statusBarItem(text: TextMatch): Locator;
  clickStatusBar(text: TextMatch, timeoutMs?: number): Promise<void>;
  /** The quick input (a quick pick or an input box), once it shows. */
  quickPick(timeoutMs?: number): Promise<Locator>;
  /**
   * The labels of the quick pick's items as it shows them now. Its list draws only the rows in
   * sight (about 15): type into its input to reach others.
   */
  quickPickItems(timeoutMs?: number): Promise<string[]>;
  /**
   * Clicks the quick pick's item whose label is `label` (a string: all of it; a RegExp: as it
   * matches), once it shows (items may come late).
   */
  pickQuickItem(label: TextMatch, timeoutMs?: number): Promise<void>;
  /**
   * The messages of the notifications (and of a dialog) that show. When no quick input shows
   * (opening the notification center would close it), also those whose toast was hidden: the
   * center is opened to read them, and closed again, which hides the toasts (their buttons are
   * then in the center: open it with the status bar's bell).
   */
  notifications(): Promise<string[]>;
  /** Waits for a notification whose message contains `text` (or matches it); returns it. */
  waitForNotification(text: TextMatch, timeoutMs?: number): Promise<string>;
  /** Opens a workspace file with Quick Open (Ctrl+P); its editor has the focus then. */
  openFile(relativePath: string, timeoutMs?: number): Promise<void>;
  /** Sets a breakpoint on `line` (from 1) of a workspace file (Ctrl+G, F9) and sees its glyph. */
  setBreakpoint(relativePath: string, line: number, timeoutMs?: number): Promise<void>;
  /** Starts debugging the selected launch configuration: F5's command, from the palette. */
  startDebugging(timeoutMs?: number): Promise<void>;
  /** Waits until the debugger is paused (the debug toolbar offers Continue); says where. */
  waitForDebugStopped(timeoutMs?: number): Promise<DebugStop>;
  /** Continues a paused debugger: the debug toolbar's Continue (F5). */
  continueDebugging(timeoutMs?: number): Promise<void>;
  /** Stops debugging (the toolbar's Stop or Disconnect, Shift+F5) and waits for its end. */
  stopDebugging(timeoutMs?: number): Promise<void>;
  /**
   * The Debug Console's text, a line per entry without its source location; the console is
   * opened first if it does not show. It draws only the entries in sight.
   */
  debugConsoleText(timeoutMs?: number): Promise<string>;
  /** Waits for the Debug Console to contain `text` (or match it); returns all it shows. */
  waitForDebugConsole(text: TextMatch, timeoutMs?: number): Promise<string>;
  /**
   * All that was written to the extension output channel `name` (plain or log), read from the
   * file VS Code keeps it in ('' before anything was): the Output view shows only the lines in
   * sight, of one channel.
   */
  outputChannelText(name: string): string;
  /** The extension host's log (activations, their errors). */
  extensionHostLog(): string;
  /** What code-server and the browser printed last. */
  output(): string;
  /**
   * Closes the browser and ends every process of this editor (code-server, the extension host,
   * terminals, debugged programs, the browser's), then removes its state. Safe to call again
   * and after a failure.
   */
  close(): Promise<void>;
}

/**
 * User settings that keep the workbench quiet and offline: no welcome page, tips,
 * recommendations, update or telemetry traffic (this machine reaches no such service, and a
 * failed request can end in a notification), no animations to wait out. A test's settings win.
 */
const QUIET_SETTINGS: Record<string, unknown> = {
  'workbench.startupEditor': 'none',
  'workbench.welcomePage.walkthroughs.openOnInstall': false,
  'workbench.tips.enabled': false,
  'workbench.enableExperiments': false,
  'workbench.reduceMotion': 'on',
  'workbench.settings.enableNaturalLanguageSearch': false,
  'telemetry.telemetryLevel': 'off',
  'update.mode': 'none',
  'update.showReleaseNotes': false,
  'extensions.ignoreRecommendations': true,
  'extensions.autoCheckUpdates': false,
  'extensions.autoUpdate': false,
  'typescript.disableAutomaticTypeAcquisition': true,
  'npm.fetchOnlinePackageInfo': false,
  'json.schemaDownload.enable': false,
  // A workspace inside a repository would otherwise ask whether to open the parent's.
  'git.openRepositoryInParentFolders': 'never',
  // code-server offers each port a debugged program listens on, in a notification.
  'remote.autoForwardPorts': false,
  'terminal.integrated.enablePersistentSessions': false,
  'debug.internalConsoleOptions': 'openOnSessionStart',
};

/** User settings the methods rely on; they win over a test's. */
const DRIVEN_SETTINGS: Record<string, unknown> = {
  // No trust prompt, and extensions run in full.
  'security.workspace.trust.enabled': false,
  // The Call Stack view, which waitForDebugStopped() reads, opens on a break.
  'debug.openDebug': 'openOnDebugBreak',
  // The toolbar whose buttons continue and stop the debugger.
  'debug.toolBarLocation': 'floating',
  // close() unloads the page: nothing may hold it.
  'window.confirmBeforeClose': 'never',
};

/**
 * The environment of the test run less what would change what code-server does: inside a VS
 * Code terminal VSCODE_IPC_HOOK_CLI makes it open the folder in that editor instead; PORT,
 * PASSWORD and CODE_SERVER_* / CS_* override its flags. Jest's own NODE_ENV=test and
 * JEST_WORKER_ID go too: a user's debugged program does not get them.
 */
function inheritedEnv(): NodeJS.ProcessEnv {
  return Object.fromEntries(
    Object.entries(process.env).filter(
      ([name]) =>
        !/^(VSCODE_|CODE_SERVER_|CS_)/.test(name) &&
        !['PORT', 'PASSWORD', 'HASHED_PASSWORD', 'NODE_ENV', 'JEST_WORKER_ID'].includes(name),
    ),
  );
}

const QUICK_INPUT = '.quick-input-widget';
const QUICK_INPUT_BOX = `${QUICK_INPUT} .quick-input-box input`;
const QUICK_ROW = `${QUICK_INPUT} .quick-input-list .monaco-list-row`;
/** A row's label and description; the row's second line (its detail) has a label of its own. */
const QUICK_LABEL = '.quick-input-list-row:first-child .label-name';
const QUICK_DESCRIPTION = '.quick-input-list-row:first-child .label-description';
const STATUS_BAR = '#workbench\\.parts\\.statusbar';
const BELL = `${STATUS_BAR} #status\\.notifications .statusbar-item-label`;
const DEBUG_TOOLBAR = '.debug-toolbar';
const DEBUG_CONTINUE = `${DEBUG_TOOLBAR} .action-label.codicon-debug-continue`;
const DEBUG_STOP = `${DEBUG_TOOLBAR} .action-label:is(.codicon-debug-stop, .codicon-debug-disconnect)`;
const REPL = '.repl';
const TOAST_MESSAGE = '.notifications-toasts .notification-list-item-message';
const CENTER = '.notifications-center';
const CENTER_MESSAGE = `${CENTER} .notification-list-item-message`;
const DIALOG_MESSAGE = '.monaco-dialog-box .dialog-message-text';

const ANSI_COLOR = new RegExp(`${String.fromCharCode(27)}\\[[\\d;]*m`, 'g');

function escapeRegExp(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

/** All of `text`, as playwright's hasText sees an element's text (spaces collapsed, trimmed). */
function whole(text: string): RegExp {
  return new RegExp(`^\\s*${escapeRegExp(text)}\\s*$`);
}

function pattern(text: TextMatch): RegExp {
  return typeof text === 'string' ? new RegExp(escapeRegExp(text)) : text;
}

function firstMatch(texts: string[], text: TextMatch): string | undefined {
  return texts.find((t) => pattern(text).test(t));
}

/** Time left until a deadline, for each of a step's waits in turn. */
class Deadline {
  private readonly end: number;

  constructor(ms: number) {
    this.end = Date.now() + ms;
  }

  left(): number {
    return Math.max(1, this.end - Date.now());
  }
}

/** `promise`, or a rejection naming `what` after `ms`: for calls that take no deadline. */
function within<T>(what: string, ms: number, promise: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new WaitTimeout(`timed out after ${ms / 1000} s: ${what}`)),
      ms,
    );
  });
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
}

/** The last lines code-server and the browser printed, for the message of a failure. */
class OutputTail {
  private readonly lines: string[] = [];

  add(line: string): void {
    this.lines.push(line);
    if (this.lines.length > 200) this.lines.shift();
  }

  follow(child: ChildProcess): void {
    for (const stream of [child.stdout, child.stderr]) {
      let partial = '';
      stream?.setEncoding('utf8').on('data', (chunk: string) => {
        const lines = (partial + chunk).split('\n');
        partial = lines.pop() ?? '';
        for (const line of lines) this.add(line);
      });
    }
  }

  text(): string {
    return this.lines.join('\n');
  }
}

let madeCount = 0;

/**
 * Installs `extensions`, starts code-server on a free loopback port and opens `workspace` in a
 * browser; resolves once the workbench shows and the extension host has activated the
 * extensions that start with it (onStartupFinished ones follow at once).
 */
export function startEditor(options: EditorOptions): Promise<Editor> {
  return CodeServerEditor.start(options);
}

class CodeServerEditor implements Editor {
  private context: BrowserContext | undefined;
  private openedPage: Page | undefined;
  private readonly log = new OutputTail();
  private shots = 0;
  private closed = false;

  private constructor(
    /** EDITOR_MARK's value in every process of this editor, and its state directory's name. */
    private readonly name: string,
    private readonly stateDir: string,
    readonly userDataDir: string,
    private readonly options: EditorOptions,
  ) {}

  static async start(options: EditorOptions): Promise<Editor> {
    const install = codeServerDir();
    const entry = join(install, 'node_modules/code-server/out/node/entry.js');
    if (!existsSync(join(install, '.installed'))) {
      throw new Error(
        `code-server ${CODE_SERVER_VERSION} is not installed in ${install}: run bash test/editor/install.sh (npm test's set-up does)`,
      );
    }
    madeCount += 1;
    const name = `${EDITOR_PREFIX}-${process.pid}-${madeCount}`;
    const state = join(tmpdir(), name);
    // A directory of this name can only be a killed run's, whose process had this pid.
    rmSync(state, { recursive: true, force: true });
    const dir = (sub: string): string => {
      mkdirSync(join(state, sub), { recursive: true, mode: 0o700 });
      return join(state, sub);
    };
    const editor = new CodeServerEditor(name, state, dir('user-data'), options);
    try {
      await editor.launch(entry, {
        XDG_CONFIG_HOME: dir('config'),
        XDG_DATA_HOME: dir('data'),
        XDG_STATE_HOME: dir('state'),
        XDG_CACHE_HOME: dir('cache'),
        XDG_RUNTIME_DIR: dir('runtime'),
        TMPDIR: dir('tmp'),
      });
      return editor;
    } catch (error) {
      await editor.close().catch(() => undefined);
      throw error;
    }
  }

  private async launch(entry: string, xdg: Record<string, string>): Promise<void> {
    const { options, name, stateDir, userDataDir } = this;
    mkdirSync(options.screenshots, { recursive: true });
    mkdirSync(join(userDataDir, 'User'));
    writeFileSync(
      join(userDataDir, 'User/settings.json'),
      JSON.stringify({ ...QUIET_SETTINGS, ...options.settings, ...DRIVEN_SETTINGS }, null, 2),
    );
    // Without --config code-server writes a default one (with a password) to its config directory.
    const config = join(stateDir, 'code-server.yaml');
    writeFileSync(config, 'auth: none\ncert: false\n');
    const env = { ...inheritedEnv(), ...options.env, ...xdg, [EDITOR_MARK]: name };
    const common = [
      entry,
      '--config',
      config,
      '--user-data-dir',
      userDataDir,
      '--extensions-dir',
      join(stateDir, 'extensions'),
    ];

    if (options.extensions.length) {
      const vsix = options.extensions.flatMap((file) => ['--install-extension', resolve(file)]);
      await this.runToEnd([...common, ...vsix], env, 120_000);
    }

    const server = spawn(
      process.execPath,
      [
        ...common,
        '--auth',
        'none',
        // Port 0: the system picks a free one, which code-server then prints.
        '--bind-addr',
        '127.0.0.1:0',
        '--disable-telemetry',
        '--disable-update-check',
        '--disable-workspace-trust',
        '--disable-getting-started-override',
      ],
      { env, stdio: ['ignore', 'pipe', 'pipe'] },
    );
    this.log.follow(server);
    const address = await this.step('start code-server', 60_000, (deadline) =>
      waitFor(
        'code-server to listen',
        () => {
          if (server.exitCode !== null || server.signalCode !== null) {
            throw new Error(`code-server ended (${server.exitCode ?? server.signalCode})`);
          }
          return /HTTP server listening on (http:\/\/\S+)/.exec(this.log.text())?.[1];
        },
        { ms: deadline.left(), everyMs: 100 },
      ),
    );

    const browserHome = join(stateDir, 'browser-home');
    mkdirSync(browserHome);
    const context = await this.step('start the browser', 60_000, (deadline) =>
      chromium.launchPersistentContext(join(stateDir, 'browser'), {
        executablePath: '/usr/bin/chromium',
        headless: true,
        args: [
          '--no-sandbox',
          '--disable-gpu',
          '--disable-background-networking',
          '--disable-component-update',
          '--disable-sync',
          '--no-first-run',
        ],
        viewport: { width: 1400, height: 900 },
        // Chromium keeps a certificate database in $HOME: it gets a home of its own.
        env: { ...inheritedEnv(), ...xdg, HOME: browserHome, [EDITOR_MARK]: name },
        timeout: deadline.left(),
      }),
    );
    this.context = context;
    const page = context.pages()[0] ?? (await context.newPage());
    this.openedPage = page;
    page.on('console', (message) => {
      if (message.type() === 'error') this.log.add(`browser: ${message.text()}`);
    });
    page.on('pageerror', (error) => this.log.add(`browser: ${error.message}`));
    const url = new URL(address);
    url.searchParams.set('folder', resolve(options.workspace));
    await this.step('open the workbench', 90_000, async (deadline) => {
      await page.goto(url.href, { waitUntil: 'domcontentloaded', timeout: deadline.left() });
      await page.locator(`${STATUS_BAR} #status\\.problems`).waitFor({ timeout: deadline.left() });
      await waitFor(
        'the extension host to activate the startup extensions',
        () => this.extensionHostLog().includes('Eager extensions activated'),
        { ms: deadline.left(), everyMs: 100 },
      );
    });
  }

  /** Runs code-server for a one-off command (installing extensions) to its end. */
  private runToEnd(args: string[], env: NodeJS.ProcessEnv, ms: number): Promise<void> {
    return new Promise((resolvePromise, reject) => {
      const child = spawn(process.execPath, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
      this.log.follow(child);
      const timer = setTimeout(() => child.kill('SIGKILL'), ms);
      child.on('error', reject);
      child.on('close', (code, signal) => {
        clearTimeout(timer);
        if (code === 0) resolvePromise();
        else {
          const output = this.log.text().slice(-4000);
          const command = `code-server ${args.slice(1).join(' ')}`;
          reject(new Error(`${command} ended with ${code ?? signal}:\n${output}`));
        }
      });
    });
  }

  get page(): Page {
    if (!this.openedPage) throw new Error('editor: the browser is not open (yet)');
    return this.openedPage;
  }

  output(): string {
    return this.log.text();
  }

  async screenshot(step: string): Promise<string> {
    this.shots += 1;
    const file = join(
      this.options.screenshots,
      `${String(this.shots).padStart(2, '0')}-${step.replace(/[^\w.-]+/g, '-')}.png`,
    );
    await this.page.screenshot({ path: file });
    return file;
  }

  /**
   * Runs `body` with a deadline of `ms`; its failure names `what`, and comes with a screenshot
   * and code-server's last output.
   */
  private async step<T>(
    what: string,
    ms: number,
    body: (deadline: Deadline) => Promise<T>,
  ): Promise<T> {
    try {
      return await body(new Deadline(ms));
    } catch (error) {
      const shot = this.openedPage
        ? await this.screenshot(`failed-${what}`).catch(() => 'none (the page is gone)')
        : 'none (no page yet)';
      // Playwright's messages color their call logs.
      const cause = (error instanceof Error ? error.message : String(error)).replace(
        ANSI_COLOR,
        '',
      );
      throw new Error(
        `editor: could not ${what} within ${ms / 1000} s: ${cause}\nscreenshot: ${shot}\ncode-server's last output:\n${this.log.text().slice(-4000)}`,
        { cause: error },
      );
    }
  }

  extensionHostLog(): string {
    return this.logFiles((path) => path.endsWith('/remoteexthost.log'))
      .map((file) => readFileSync(file, 'utf8'))
      .join('');
  }

  outputChannelText(name: string): string {
    // A plain channel's file is output_logging_*/N-NAME.log, a log channel's EXTENSION/NAME.log.
    const file = new RegExp(`/exthost\\d+/[^/]+/(\\d+-)?${escapeRegExp(name)}\\.log$`);
    return this.logFiles((path) => file.test(path))
      .map((path) => readFileSync(path, 'utf8'))
      .join('');
  }

  private logFiles(pick: (path: string) => boolean): string[] {
    const logs = join(this.userDataDir, 'logs');
    if (!existsSync(logs)) return [];
    return readdirSync(logs, { recursive: true, encoding: 'utf8' })
      .map((path) => join(logs, path))
      .filter(pick)
      .sort();
  }

  async runCommand(title: string, timeoutMs = 15_000): Promise<void> {
    await this.step(`run the command "${title}"`, timeoutMs, async (deadline) => {
      const value = `>${title}`;
      const input = await this.openQuickInput('F1', deadline);
      await input.fill(value);
      // Enter would take the best match, which may be another command ("Debug: Select and
      // Start Debugging" for "Debug: Start Debugging"): the row with this very label is clicked.
      await this.clickQuickRow(whole(title), deadline);
      await waitFor('the command palette to take the pick', () => this.quickInputMovedOn(value), {
        ms: deadline.left(),
      });
    });
  }

  statusBarItem(text: TextMatch): Locator {
    const items = this.page.locator(`${STATUS_BAR} .statusbar-item`);
    return items
      .filter({ hasText: pattern(text) })
      .or(items.filter({ has: this.page.getByRole('button', { name: pattern(text) }) }));
  }

  async clickStatusBar(text: TextMatch, timeoutMs = 15_000): Promise<void> {
    await this.step(`click the status bar entry ${String(text)}`, timeoutMs, (deadline) =>
      this.statusBarItem(text).locator('.statusbar-item-label').click({ timeout: deadline.left() }),
    );
  }

  async quickPick(timeoutMs = 15_000): Promise<Locator> {
    const widget = this.page.locator(QUICK_INPUT);
    await this.step('see a quick pick', timeoutMs, (deadline) =>
      widget.waitFor({ timeout: deadline.left() }),
    );
    return widget;
  }

  async quickPickItems(timeoutMs = 15_000): Promise<string[]> {
    await this.quickPick(timeoutMs);
    return this.quickLabels();
  }

  private async quickLabels(): Promise<string[]> {
    const rows = await this.page.locator(QUICK_ROW).evaluateAll(
      (elements, label) =>
        elements.map((row) => ({
          index: Number(row.getAttribute('data-index')),
          label: row.querySelector(label)?.textContent?.trim() ?? '',
        })),
      QUICK_LABEL,
    );
    return rows.sort((a, b) => a.index - b.index).map((row) => row.label);
  }

  async pickQuickItem(label: TextMatch, timeoutMs = 15_000): Promise<void> {
    await this.step(`pick the item ${String(label)}`, timeoutMs, async (deadline) => {
      await this.page.locator(QUICK_INPUT).waitFor({ timeout: deadline.left() });
      await this.clickQuickRow(typeof label === 'string' ? whole(label) : label, deadline);
    });
  }

  async notifications(): Promise<string[]> {
    const shown = await this.shownNotifications();
    const center = this.page.locator(CENTER);
    const bell = this.page.locator(BELL);
    if (
      (await center.isVisible()) ||
      (await this.page.locator(QUICK_INPUT).isVisible()) ||
      !(await bell.isVisible())
    ) {
      return shown;
    }
    await bell.click();
    await center.waitFor({ timeout: 5_000 });
    const all = await this.shownNotifications();
    await bell.click();
    // The bell does not always close the center it opened (it took the focus): Escape does.
    if (await center.isVisible()) await this.page.keyboard.press('Escape');
    await center.waitFor({ state: 'hidden', timeout: 5_000 });
    return [...new Set([...shown, ...all])];
  }

  /** The messages of the toasts, of the notification center if it is open, and of a dialog. */
  private async shownNotifications(): Promise<string[]> {
    const texts: string[] = [];
    for (const selector of [TOAST_MESSAGE, CENTER_MESSAGE, DIALOG_MESSAGE]) {
      texts.push(
        ...(await this.page.locator(selector).filter({ visible: true }).allTextContents()),
      );
    }
    return [...new Set(texts.map((text) => text.trim()))];
  }

  async waitForNotification(text: TextMatch, timeoutMs = 30_000): Promise<string> {
    return this.step(`see a notification ${String(text)}`, timeoutMs, async (deadline) => {
      const inSight = async (): Promise<string | undefined> =>
        firstMatch(await this.shownNotifications(), text);
      // The center, which hides the toasts (and their buttons) once opened, is looked into only
      // once no toast showed it within the time: its toast may have gone by then.
      try {
        return await waitFor('its toast', inSight, { ms: deadline.left(), everyMs: 200 });
      } catch (error) {
        if (!(error instanceof WaitTimeout)) throw error;
        const all = await this.notifications();
        const late = firstMatch(all, text);
        if (late) return late;
        throw new Error(`the notifications are ${JSON.stringify(all)}`, { cause: error });
      }
    });
  }

  async openFile(relativePath: string, timeoutMs = 20_000): Promise<void> {
    await this.step(`open ${relativePath}`, timeoutMs, (deadline) =>
      this.openFileWithin(relativePath, deadline),
    );
  }

  private async openFileWithin(relativePath: string, deadline: Deadline): Promise<void> {
    const path = resolve(this.options.workspace, relativePath);
    const input = await this.openQuickInput('Control+P', deadline);
    await input.fill(relativePath);
    const folder = dirname(relativePath);
    const named = this.quickRow(whole(basename(path)));
    // A file at the top has no description; the others have their folder as one.
    const row =
      folder === '.'
        ? named.filter({
            hasNot: this.page.locator(QUICK_DESCRIPTION).filter({ hasText: /\S/ }),
          })
        : named.filter({
            has: this.page.locator(QUICK_DESCRIPTION, {
              hasText: new RegExp(`(^|/)${escapeRegExp(folder)}\\s*$`),
            }),
          });
    await row.first().click({ timeout: deadline.left() });
    // The tab's icon label carries the file's full path.
    const label = path.replace(/["\\]/g, '\\$&');
    await this.page
      .locator(`.tabs-container .tab.active .monaco-icon-label[aria-label="${label}"]`)
      .waitFor({ timeout: deadline.left() });
  }

  async setBreakpoint(relativePath: string, line: number, timeoutMs = 30_000): Promise<void> {
    await this.step(`set a breakpoint at ${relativePath}:${line}`, timeoutMs, async (deadline) => {
      await this.openFileWithin(relativePath, deadline);
      const input = await this.openQuickInput('Control+G', deadline);
      await input.fill(`:${line}`);
      await input.press('Enter');
      await this.page.locator(QUICK_INPUT).waitFor({ state: 'hidden', timeout: deadline.left() });
      await waitFor(`the cursor on line ${line}`, () => this.cursorOnLine(line), {
        ms: deadline.left(),
      });
      // F9 toggles: one already there stays.
      if (!(await this.breakpointOnLine(line))) await this.page.keyboard.press('F9');
      await waitFor(`a breakpoint glyph on line ${line}`, () => this.breakpointOnLine(line), {
        ms: deadline.left(),
      });
    });
  }

  private activeEditor(): Locator {
    return this.page.locator('.editor-group-container.active .monaco-editor').first();
  }

  /** Whether the active editor's cursor is on `line`: its number is drawn as the active one. */
  private cursorOnLine(line: number): Promise<boolean> {
    return this.activeEditor().evaluate(
      (editor, wanted) =>
        [...editor.querySelectorAll('.margin-view-overlays .active-line-number')].some(
          (number) => number.textContent?.trim() === wanted,
        ),
      String(line),
    );
  }

  /** Whether a breakpoint glyph (of any kind) sits level with the number of `line`. */
  private breakpointOnLine(line: number): Promise<boolean> {
    return this.activeEditor().evaluate((editor, wanted) => {
      const number = [...editor.querySelectorAll('.margin-view-overlays .line-numbers')].find(
        (n) => n.textContent?.trim() === wanted,
      );
      const top = number?.parentElement?.style.top;
      if (!top) return false;
      return [
        ...editor.querySelectorAll<HTMLElement>(
          '.glyph-margin-widgets [class*="codicon-debug-breakpoint"]',
        ),
      ].some((glyph) => glyph.style.top === top);
    }, String(line));
  }

  async startDebugging(timeoutMs = 15_000): Promise<void> {
    await this.runCommand('Debug: Start Debugging', timeoutMs);
  }

  async waitForDebugStopped(timeoutMs = 30_000): Promise<DebugStop> {
    return this.step('see the debugger stop', timeoutMs, async (deadline) => {
      await this.page.locator(DEBUG_CONTINUE).waitFor({ timeout: deadline.left() });
      const stack = this.page.locator('.debug-call-stack');
      const frame = stack.locator('.monaco-list-row:has(.stack-frame)').first();
      await frame.waitFor({ timeout: deadline.left() });
      const reason = stack.locator('.state.label').filter({ visible: true }).first();
      return {
        reason: ((await reason.textContent({ timeout: deadline.left() })) ?? '').trim(),
        frame: ((await frame.getAttribute('aria-label')) ?? '').replace(/^Stack Frame /, ''),
      };
    });
  }

  async continueDebugging(timeoutMs = 15_000): Promise<void> {
    await this.step('continue the debugger', timeoutMs, (deadline) =>
      this.page.locator(DEBUG_CONTINUE).click({ timeout: deadline.left() }),
    );
  }

  async stopDebugging(timeoutMs = 30_000): Promise<void> {
    await this.step('stop debugging', timeoutMs, (deadline) =>
      waitFor(
        'every debug session to end',
        async () => {
          if (!(await this.page.locator(DEBUG_TOOLBAR).isVisible())) return true;
          // Stop acts on the focused session; the toolbar stays while another one runs.
          await this.page
            .locator(DEBUG_STOP)
            .click({ timeout: 1_000 })
            .catch(() => undefined);
          return false;
        },
        { ms: deadline.left(), everyMs: 200 },
      ),
    );
  }

  async debugConsoleText(timeoutMs = 15_000): Promise<string> {
    await this.showDebugConsole(timeoutMs);
    return this.readDebugConsole();
  }

  async waitForDebugConsole(text: TextMatch, timeoutMs = 30_000): Promise<string> {
    await this.showDebugConsole(timeoutMs);
    return this.step(`see ${String(text)} in the Debug Console`, timeoutMs, async (deadline) => {
      let last = '';
      try {
        return await waitFor(
          'it',
          async () => {
            last = await this.readDebugConsole();
            return pattern(text).test(last) && last;
          },
          { ms: deadline.left(), everyMs: 200 },
        );
      } catch (error) {
        throw new Error(`it reads ${JSON.stringify(last)}`, { cause: error });
      }
    });
  }

  private async showDebugConsole(timeoutMs: number): Promise<void> {
    if (await this.page.locator(REPL).isVisible()) return;
    await this.runCommand('Debug Console: Focus on Debug Console View', timeoutMs);
    await this.step('see the Debug Console', timeoutMs, (deadline) =>
      this.page.locator(REPL).waitFor({ timeout: deadline.left() }),
    );
  }

  private async readDebugConsole(): Promise<string> {
    const rows = await this.page.locator(`${REPL} .monaco-list-row`).evaluateAll((elements) =>
      elements.map((row) => {
        const contents = row.querySelector('.monaco-tl-contents')?.cloneNode(true);
        if (!(contents instanceof HTMLElement)) return { index: 0, text: '' };
        for (const extra of contents.querySelectorAll('.source, .count-badge-wrapper')) {
          extra.remove();
        }
        return {
          index: Number(row.getAttribute('data-index')),
          text: (contents.textContent ?? '').replace(/\n$/, ''),
        };
      }),
    );
    return rows
      .sort((a, b) => a.index - b.index)
      .map((row) => row.text)
      .join('\n');
  }

  /**
   * Opens a quick input with `key` (F1, Ctrl+P, Ctrl+G) and returns its text box. One already
   * open is closed first, so that the key opens a fresh one and nothing is typed into the old.
   */
  private async openQuickInput(key: string, deadline: Deadline): Promise<Locator> {
    const widget = this.page.locator(QUICK_INPUT);
    if (await widget.isVisible()) {
      await this.page.keyboard.press('Escape');
      await widget.waitFor({ state: 'hidden', timeout: deadline.left() });
    }
    await this.page.keyboard.press(key);
    const input = this.page.locator(QUICK_INPUT_BOX);
    await input.waitFor({ timeout: deadline.left() });
    return input;
  }

  /** Clicks the first quick input row whose label matches; failing, says which rows show. */
  private async clickQuickRow(label: RegExp, deadline: Deadline): Promise<void> {
    try {
      await this.quickRow(label).first().click({ timeout: deadline.left() });
    } catch (error) {
      const shown = await this.quickLabels().catch(() => []);
      throw new Error(`no item ${String(label)} among ${JSON.stringify(shown)}`, { cause: error });
    }
  }

  private quickRow(label: RegExp): Locator {
    return this.page
      .locator(QUICK_ROW)
      .filter({ has: this.page.locator(QUICK_LABEL, { hasText: label }) });
  }

  /** Whether the quick input closed, or went on to another step, since `value` was typed. */
  private async quickInputMovedOn(value: string): Promise<boolean> {
    if (!(await this.page.locator(QUICK_INPUT).isVisible())) return true;
    return (await this.page.locator(QUICK_INPUT_BOX).inputValue()) !== value;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const mine = (): number[] =>
      [...editorProcesses()].filter(([, name]) => name === this.name).map(([pid]) => pid);
    const { openedPage, context } = this;
    if (openedPage && context) {
      // Unloading, the workbench has the extension host run the extensions' deactivate() (which
      // may end what they started) and exit; a killed one would not. What does not end so (a
      // crashed page's extension host, a browser that hangs) is killed below.
      await within('the workbench to unload', 10_000, openedPage.close({ runBeforeUnload: true }))
        .then(() =>
          waitFor(
            'the extension host to end',
            () => !mine().some((pid) => commandLine(pid)?.includes('--type=extensionHost')),
            { ms: 10_000, everyMs: 100 },
          ),
        )
        .catch(() => undefined);
      await within('the browser to close', 10_000, context.close()).catch(() => undefined);
    }
    const signal = (name: NodeJS.Signals): void => {
      for (const pid of mine()) {
        try {
          process.kill(pid, name);
        } catch {
          // Gone meanwhile.
        }
      }
    };
    const ended = (ms: number): Promise<boolean> =>
      waitFor('the processes to end', () => mine().length === 0, { ms, everyMs: 100 }).catch(
        () => false,
      );
    signal('SIGTERM');
    if (!(await ended(10_000))) {
      signal('SIGKILL');
      await ended(5_000);
    }
    rmSync(this.stateDir, { recursive: true, force: true, maxRetries: 3 });
    const left = mine();
    if (left.length) throw new Error(`editor: processes left after SIGKILL: ${left.join(', ')}`);
  }
}
