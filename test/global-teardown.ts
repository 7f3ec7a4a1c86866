import { ownerOf } from '../src/platform/local/netns.js';
import { removeLeftovers } from './support/leftovers.js';

/**
 * Tests run in band, so whatever this process made and did not remove is a leak: the suite
 * fails on it (after removing it).
 */
export default function globalTeardown(): void {
  const leaked = removeLeftovers((name) => ownerOf(name) === process.pid);
  if (leaked.length) throw new Error(`tests leaked: ${leaked.join(', ')}`);
}
