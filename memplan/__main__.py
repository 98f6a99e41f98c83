from memplan.cli import main

if __name__ == "__main__":  # not when a spawned worker (memplan.pipeline.prefetch_profiles) imports it
    main()
