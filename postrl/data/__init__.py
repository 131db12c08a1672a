"""Record formats, pipelines and built-in synthetic tasks."""

from postrl.data.tasks import Problem, arithmetic_problems
