"""Package discovery that pyproject.toml cannot state (everything else is there).

The recipes stay where users read them, in the repository's ``experiments/`` folder, and install as the package
``nni_darts_variants.recipes`` (its sub-folders as data packages), which ``nni_darts_variants.config.recipe_root``
finds through ``importlib.resources``: an installed package runs ``nni-darts search cifar10/search/darts-1st.yml``.
"""
from setuptools import find_namespace_packages, setup

RECIPES = 'nni_darts_variants.recipes'

code = find_namespace_packages(include=['nni_darts_variants', 'nni_darts_variants.*', 'search_spaces',
                                        'search_spaces.*'], exclude=['*.__pycache__'])
recipes = [RECIPES] + [f'{RECIPES}.{name}' for name in find_namespace_packages('experiments', exclude=['*__pycache__'])]
setup(packages=code + recipes, package_dir={RECIPES: 'experiments'})
