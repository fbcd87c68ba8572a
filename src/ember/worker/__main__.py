from ember.worker.lifeline import die_with_parent

die_with_parent()  # first: a worker must not outlive `ember serve`, even while it imports torch

from ember.worker.main import main  # noqa: E402

if __name__ == "__main__":
    main()
