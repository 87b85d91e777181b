"""FTP's sparsity schedule: from the target compute sparsity to the schedule mean, the uniform schedule, and the
genetic-algorithm search over per-block sparsities (methods.md §3 step 1 and 3, §5)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from methods.flop_coefficients import LayerFlopCoefficients


def token_sparsity_for_compute(compute_sparsity: float, config, seq_len: int) -> float:
    """Mean token sparsity S whose uniform schedule gives compute sparsity c at `seq_len` (methods.md §5):
    solve 1 - F(kN, kN) / F(N, N) = c for the kept fraction k = 1 - S, F(n, n) = (a + g)·n + b·n²."""
    if compute_sparsity <= 0:
        return 0.0
    coeff = LayerFlopCoefficients.from_config(config)
    linear, quadratic = (coeff.a + coeff.g) * seq_len, coeff.b * seq_len * seq_len
    target = (1.0 - compute_sparsity) * (linear + quadratic)
    kept = (-linear + math.sqrt(linear * linear + 4.0 * quadratic * target)) / (2.0 * quadratic)
    return 1.0 - kept


def uniform_schedule(num_blocks: int, mean: float) -> list[float]:
    """s_0 = 0 and every other block at the same sparsity, with mean(s) = `mean`."""
    rest = mean * num_blocks / (num_blocks - 1) if num_blocks > 1 else 0.0
    return [0.0] + [rest] * (num_blocks - 1)


def scaled_schedule(schedule: Sequence[float], scale: float, max_sparsity: float) -> list[float]:
    """The schedule multiplied by `scale`, clipped to [0, max_sparsity] (s_0 stays 0)."""
    return [min(max_sparsity, max(0.0, s * scale)) for s in schedule]


@dataclass(frozen=True)
class GAConfig:
    """Genetic-algorithm settings (methods.md §3 defaults: population 32, 30 generations, 4 elites, tournament
    selection, arithmetic crossover, mean-preserving transfer mutation δ ~ U(0, 0.1), 0 ≤ s_i ≤ 0.9, s_0 = 0)."""

    population: int = 32
    generations: int = 30
    elites: int = 4
    tournament_size: int = 3
    mutation_delta: float = 0.1
    mutation_prob: float = 0.8
    max_sparsity: float = 0.9
    initial_mutations: int = 0  # transfer mutations per random initial member; 0 → 2·(number of blocks)


@dataclass
class GAResult:
    best: list[float]
    best_fitness: list[float]  # per generation, generation 0 = the initial population
    mean_fitness: list[float]
    population: list[list[float]] = field(default_factory=list)  # final population, best first
    evaluations: int = 0


def _transfer_mutation(schedule: list[float], rng: random.Random, delta_max: float, max_sparsity: float) -> None:
    """Move δ ~ U(0, delta_max) of sparsity from one free block to another, in place; keeps the mean and bounds."""
    free = range(1, len(schedule))
    if len(free) < 2:
        return
    source, target = rng.sample(free, 2)
    delta = min(rng.uniform(0.0, delta_max), schedule[source], max_sparsity - schedule[target])
    schedule[source] -= delta
    schedule[target] += delta


def _tournament(ranked: list[list[float]], rng: random.Random, size: int) -> list[float]:
    """Tournament selection on a population sorted best first: the lowest sampled index wins."""
    return ranked[min(rng.sample(range(len(ranked)), min(size, len(ranked))))]


def genetic_search(fitness: Callable[[list[float]], float], num_blocks: int, mean: float, config: GAConfig,
                   seed: int = 0, initial_population: Sequence[Sequence[float]] | None = None,
                   progress: bool = True, desc: str = "ftp: schedule search") -> GAResult:
    """Maximise `fitness` over schedules s with s_0 = 0, 0 ≤ s_i ≤ max, mean(s) = `mean`.

    Arithmetic crossover of two feasible parents and the transfer mutation both stay feasible, so the mean is
    kept exactly without repair. Fitness values are cached per schedule (elites are not re-evaluated)."""
    if num_blocks < 2:
        raise ValueError("the schedule search needs at least two blocks (block 0 is always dense)")
    if mean * num_blocks / (num_blocks - 1) > config.max_sparsity + 1e-12:
        raise ValueError(f"mean sparsity {mean:.3f} cannot be reached with s_0 = 0 and s_i <= {config.max_sparsity}")
    rng = random.Random(seed)
    base = uniform_schedule(num_blocks, mean)
    population: list[list[float]] = [list(s) for s in (initial_population or [])][: config.population]
    if not population:
        population.append(list(base))
    mutations = config.initial_mutations or 2 * num_blocks
    while len(population) < config.population:
        member = list(rng.choice(population[: max(1, len(initial_population or [base]))]))
        for _ in range(mutations):
            _transfer_mutation(member, rng, config.mutation_delta, config.max_sparsity)
        population.append(member)

    cache: dict[tuple[float, ...], float] = {}

    def score(member: list[float]) -> float:
        key = tuple(round(s, 12) for s in member)
        if key not in cache:
            cache[key] = float(fitness(member))
        return cache[key]

    best_history: list[float] = []
    mean_history: list[float] = []
    bar = tqdm(range(config.generations + 1), desc=desc, disable=not progress)
    for generation in bar:
        scores = [score(member) for member in population]
        order = sorted(range(len(population)), key=lambda i: -scores[i])
        population = [population[i] for i in order]
        scores = [scores[i] for i in order]
        best_history.append(scores[0])
        mean_history.append(sum(scores) / len(scores))
        bar.set_postfix(best_fitness=f"{scores[0]:.4f}", evaluations=len(cache))
        if generation == config.generations:
            break

        children = [list(member) for member in population[: config.elites]]
        while len(children) < config.population:
            first, second = _tournament(population, rng, config.tournament_size), \
                _tournament(population, rng, config.tournament_size)
            weight = rng.random()
            child = [weight * a + (1.0 - weight) * b for a, b in zip(first, second, strict=True)]
            child[0] = 0.0
            if rng.random() < config.mutation_prob:
                _transfer_mutation(child, rng, config.mutation_delta, config.max_sparsity)
            children.append(child)
        population = children
    return GAResult(best=population[0], best_fitness=best_history, mean_fitness=mean_history,
                    population=population, evaluations=len(cache))
