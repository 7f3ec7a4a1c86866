/** Which of the target's variables an app gets (src/features/env/selection.ts). */
import { LOCAL_VARIABLES, appEnvironment, overrideOf } from '../src/features/env/selection.js';

const local = {
  PATH: '/usr/local/bin:/usr/bin',
  HOME: '/home/dev',
  LANG: 'en_GB.UTF-8',
  EDITOR: 'vi',
};
const target: [string, string][] = [
  ['PATH', '/app/node_modules/.bin:/usr/bin'],
  ['HOME', '/root'],
  ['HOSTNAME', 'api-7f9'],
  ['LANG', 'C.UTF-8'],
  ['LC_ALL', 'C'],
  ['DATABASE_URL', 'postgres://db:5432/app'],
  ['DB_POOL', '10'],
  ['SECRET_TOKEN', 's3cr=t'],
  ['EDITOR', 'nano'],
  ['KUBERNETES_SERVICE_HOST', '10.213.192.1'],
];
const settings = { fromTarget: true, include: [], exclude: [], override: new Map() };

test("by default every target variable but the machine's own comes over the local ones", () => {
  const { env, fromTarget } = appEnvironment(local, target, settings);
  expect(env).toEqual({
    PATH: local.PATH,
    HOME: local.HOME,
    LANG: local.LANG,
    EDITOR: 'nano',
    DATABASE_URL: 'postgres://db:5432/app',
    DB_POOL: '10',
    SECRET_TOKEN: 's3cr=t',
    KUBERNETES_SERVICE_HOST: '10.213.192.1',
  });
  expect(fromTarget).toEqual([
    'DATABASE_URL',
    'DB_POOL',
    'EDITOR',
    'KUBERNETES_SERVICE_HOST',
    'SECRET_TOKEN',
  ]);
});

test('include narrows, exclude wins over include, overrides win over both', () => {
  const { env, fromTarget } = appEnvironment(local, target, {
    ...settings,
    include: ['DB_*', 'DATABASE_URL', 'SECRET_?OKEN', '*'],
    exclude: ['SECRET_*', 'KUBERNETES_*'],
    override: new Map([
      ['DATABASE_URL', 'postgres://localhost/dev'],
      ['NEW', ''],
    ]),
  });
  expect(env).toMatchObject({ DB_POOL: '10', DATABASE_URL: 'postgres://localhost/dev', NEW: '' });
  expect(env.SECRET_TOKEN).toBeUndefined();
  expect(env.KUBERNETES_SERVICE_HOST).toBeUndefined();
  // `*` does not take the machine's own variables; naming one does.
  expect(env.PATH).toBe(local.PATH);
  expect(fromTarget).toEqual(['DB_POOL', 'EDITOR']);
  const named = appEnvironment(local, target, { ...settings, include: ['PATH', 'LC_*'] });
  expect(named.env).toMatchObject({ PATH: '/app/node_modules/.bin:/usr/bin', LC_ALL: 'C' });
  expect(named.fromTarget).toEqual(['LC_ALL', 'PATH']);
});

test('--no-env keeps the local environment, overrides still apply', () => {
  const { env, fromTarget } = appEnvironment(local, target, {
    ...settings,
    fromTarget: false,
    override: new Map([['MODE', 'dev']]),
  });
  expect(env).toEqual({ ...local, MODE: 'dev' });
  expect(fromTarget).toEqual([]);
});

test('built-in local names are plain names or prefixes; overrides parse NAME=VALUE', () => {
  for (const glob of LOCAL_VARIABLES) expect(glob).toMatch(/^[A-Z_]+\*?$/);
  expect(overrideOf('A=b=c')).toEqual(['A', 'b=c']);
  expect(overrideOf('A=')).toEqual(['A', '']);
  expect(overrideOf('=x')).toBeUndefined();
  expect(overrideOf('A')).toBeUndefined();
});
