import { isStale, ownerOf } from '../../src/platform/local/netns.js';
import { removeLeftovers } from './leftovers.js';

// Loaded before every test file (setupFilesAfterEnv). Files run in band, in this one process,
// so a namespace or cgroup named after this pid that outlives its file is that file's leak.

beforeAll(() => {
  const stale = removeLeftovers(isStale);
  if (stale.length) console.log(`removed leftovers of an earlier run: ${stale.join(', ')}`);
});

afterAll(() => {
  expect(removeLeftovers((name) => ownerOf(name) === process.pid)).toEqual([]);
});
